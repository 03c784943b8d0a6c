// A TVM RPC server for a board without Python, speaking over two file descriptors given as
// arguments (what tvm.rpc.PopenSession passes): `server READ_FD WRITE_FD`. The protocol is
// libtvm_runtime's own event-driven RPC server; this program only moves packets between the pipe
// and it. compiler/measure.py links it, for the board's architecture, with the candidate kernels
// as its system library and the board's libtvm_runtime.so / libtvm_ffi.so. (TVM's own
// posix_popen_server, behind tvm.rpc.with_minrpc, needs a source tree: the wheel ships neither
// the path with_minrpc looks in nor the support headers it includes.)
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/function.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

bool read_exactly(int fd, void* data, size_t size) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = read(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // closed by the client, or an error
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool write_exactly(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// The event-driven server's answers: 0 it has shut down, 1 it wants the next packet, 2 it has
// more to write before it can take one.
enum { kShutdown = 0, kHasOutput = 2 };
const int kReadWrite = 3;

}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s READ_FD WRITE_FD (started by tvm.rpc.PopenSession)\n", argv[0]);
    return 2;
  }
  const int in = std::atoi(argv[1]), out = std::atoi(argv[2]);
  auto send = tvm::ffi::Function::FromTyped([out](TVMFFIByteArray* bytes) -> int64_t {
    return write_exactly(out, bytes->data, bytes->size) ? static_cast<int64_t>(bytes->size) : -1;
  });
  auto create = tvm::ffi::Function::GetGlobalRequired("rpc.CreateEventDrivenServer");
  auto handle = create(send, "edgemoe-popen-server", "").cast<tvm::ffi::TypedFunction<int(TVMFFIByteArray*, int)>>();
  std::vector<char> packet;
  for (;;) {
    uint64_t length;  // a packet is its length (8 bytes, little-endian) and that many bytes
    if (!read_exactly(in, &length, sizeof(length))) return 0;  // the session is over
    if (length == 0) continue;
    packet.resize(sizeof(length) + length);
    std::memcpy(packet.data(), &length, sizeof(length));
    if (!read_exactly(in, packet.data() + sizeof(length), length)) return 1;
    TVMFFIByteArray bytes{packet.data(), packet.size()};
    int status = handle(&bytes, kReadWrite);
    while (status == kHasOutput) {
      TVMFFIByteArray nothing{nullptr, 0};
      status = handle(&nothing, kReadWrite);
    }
    if (status == kShutdown) return 0;
  }
}
