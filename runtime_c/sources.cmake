# The runtime's sources every build compiles (Linux and bare metal); each build adds its own files,
# threads, storage and kernel loading (CMakeLists.txt, runtime_c/firmware/firmware.cmake).
set(EM_CORE_SOURCES
  runtime_c/src/artifact.c
  runtime_c/src/cpu_check.c
  runtime_c/src/crc32.c
  runtime_c/src/encoder_decoder.c
  runtime_c/src/expert_cache.c
  runtime_c/src/expert_lanes.c
  runtime_c/src/ffn.c
  runtime_c/src/kernels.c
  runtime_c/src/kv_cache.c
  runtime_c/src/loader.c
  runtime_c/src/matrix.c
  runtime_c/src/memory_plan.c
  runtime_c/src/mla.c
  runtime_c/src/pacer.c
  runtime_c/src/predictor.c
  runtime_c/src/prefill.c
  runtime_c/src/program.c
  runtime_c/src/routing.c
  runtime_c/src/session.c
  runtime_c/src/trunk_view.c
  runtime_c/src/tvm_backend.c)
