"""The microcontroller path end to end: the bundled model compiled for the emulated Cortex-M55 board
(mps3-an547: integer-dot kernels on Helium, and the float kernels) and Cortex-M7 board (mps2-an500:
integer-dot kernels on the DSP extension's SMLAD), its firmware built with
arm-none-eabi-gcc and run under qemu-system-arm with the flash image at the QSPI flash address,
experts streaming into an expert cache smaller than the experts, with prediction on and off. The
tokens must equal the host runtime's on the same weights and the NumPy reference's of the artifact;
a model the board cannot hold is refused at compile time, naming what does not fit."""
import shutil
import subprocess

import pytest

from edgemoe.compiler import expert_image, trunk_file
from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.firmware import BoardFitError
from edgemoe.mcu import build_firmware, run_firmware
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.runtime import REPO_ROOT, runtime_dir

from conftest import PROMPTS, TRAINED_MODEL

BOARD = "mps3-an547"
MAX_SEQ = 64
N_NEW = 12
# INT4 experts and trunk: the flash image (7.7 MiB) fits the board's 8 MiB QSPI flash, and the minimum
# session (2 MiB) its 4 MiB of SRAM; the firmware's default budget (the SRAM) holds a third of the experts
OPTIONS = dict(expert_bits=4, trunk_bits=4, max_seq=MAX_SEQ)


_built: dict = {}


def _board_artifact(tmp_path_factory, board: str, int_dot):
    """(artifact, firmware ELF, host artifact of the same weights, layout), built once per module."""
    if (board, int_dot) in _built:
        return _built[board, int_dot]
    missing = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi "
                    "qemu-system-arm (scripts/setup-dev.sh does)")
    layout = "rows" if int_dot is False else "tiles"
    base = tmp_path_factory.mktemp(f"mcu-{board}-{layout}")
    art, host = base / "board", base / "host"
    compile_model(TRAINED_MODEL, art, CompileOptions(target=board, int_dot=int_dot, **OPTIONS), log=lambda m: None)
    compile_model(TRAINED_MODEL, host, CompileOptions(target="host", int_dot=layout == "tiles", **OPTIONS),
                  log=lambda m: None)
    elf = build_firmware(art, REPO_ROOT / "build" / f"firmware-{board}-{layout}")
    _built[board, int_dot] = art, elf, host, layout
    return _built[board, int_dot]


@pytest.fixture(scope="module", params=[(BOARD, None), (BOARD, False), ("mps2-an500", None)],
                ids=["m55-int-dot", "m55-float", "m7-int-dot"])
def board_artifact(request, tmp_path_factory):
    return _board_artifact(tmp_path_factory, *request.param)


@pytest.fixture(scope="module")
def m55_artifact(tmp_path_factory):
    return _board_artifact(tmp_path_factory, BOARD, None)


def test_board_compile_writes_the_firmware_inputs(board_artifact):
    art, elf, host, layout = board_artifact
    import json

    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["layout"] == layout
    assert manifest["board"]["flash_image_bytes"] == (art / "flash.bin").stat().st_size
    assert manifest["board"]["minimum_budget_bytes"] < manifest["board"]["session_ram_bytes"]
    assert {p.name for p in (art / "firmware").iterdir()} == {"kernel_table.c", "memory.ld", "board.cmake"}
    # the host artifact holds the very same weights: the firmware and the host runtime run one model
    for name, header in (("trunk.bin", trunk_file.HEADER_BYTES), ("experts.bin", expert_image.ALIGN)):
        assert (art / name).read_bytes()[header:] == (host / name).read_bytes()[header:], name


@pytest.mark.parametrize("predictor", ["auto", "none"])
def test_firmware_tokens_match_host_and_reference(board_artifact, trained_model, tokenizer, predictor):
    art, elf, host, _ = board_artifact
    ids = tokenizer.encode(PROMPTS[0]).ids
    report = run_firmware(elf, art, ["--tokens", ",".join(map(str, ids)), "-n", str(N_NEW), "--predictor", predictor])
    want, _ = ReferenceExecutor(artifact_model(trained_model, art), MAX_SEQ).greedy(ids, N_NEW)
    proc = subprocess.run([str(runtime_dir() / "edgemoe_run"), str(host), "--tokens", ",".join(map(str, ids)), "-n",
                           str(N_NEW)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert report["tokens"] == want
    assert [int(t) for t in proc.stdout.splitlines()[0].split(",")] == want
    # experts streamed: the cache holds fewer than all of them, and records were read from flash every token
    assert report["cache_slots"] < 48 and report["flash_bytes_per_token"] > 0
    assert report["predictor"] == ("next-router" if predictor == "auto" else "none")
    assert (report["prefetch_issued"] > 0) == (predictor == "auto")
    assert report["heap_grew_after_open"] == 0 and report["heap_refused"] == 0
    assert report["instructions_per_token"] > 0


def test_firmware_reads_through_the_block_read_routine(m55_artifact, tokenizer):
    """The flash driver back end (start a transfer, poll it) gives the same tokens as the mapped window."""
    art, elf, _, _ = m55_artifact
    ids = tokenizer.encode(PROMPTS[1]).ids
    args = ["--tokens", ",".join(map(str, ids)), "-n", "6", "--cache-fraction", "0.25"]
    mapped, driver = run_firmware(elf, art, args), run_firmware(elf, art, args + ["--flash-driver"])
    assert driver["flash"] == "block-read routine" and mapped["flash"] == "memory-mapped"
    assert driver["tokens"] == mapped["tokens"]
    assert driver["flash_bytes_read"] == mapped["flash_bytes_read"]


def test_a_corrupted_flash_image_is_refused_by_name(m55_artifact, tmp_path):
    """The firmware checks what it reads as the host runtime does: the flash directory, the trunk's
    checksum, each expert record's CRC-32C (read twice, then the step fails naming the record)."""
    import struct

    from edgemoe.compiler.firmware import FLASH_ENTRY, FLASH_HEADER

    art, elf, _, _ = m55_artifact
    image = (art / "flash.bin").read_bytes()
    entries = [FLASH_ENTRY.unpack_from(image, FLASH_HEADER.size + i * FLASH_ENTRY.size) for i in range(2)]
    where = {name.rstrip(b"\0").decode(): (offset, length) for name, offset, length in entries}

    def run_with(broken: bytes, args=("--tokens", "1,464,2170", "-n", "4")):
        copy = tmp_path / "art"
        shutil.copytree(art, copy, dirs_exist_ok=True)
        (copy / "flash.bin").write_bytes(broken)
        with pytest.raises(RuntimeError) as e:
            run_firmware(elf, copy, list(args))
        return str(e.value)

    flipped = bytearray(image)
    flipped[30] ^= 1  # a file name in the directory
    assert "directory checksum mismatch" in run_with(bytes(flipped))
    flipped = bytearray(image)
    offset, length = where["trunk.bin"]
    flipped[offset + length - 100] ^= 1
    assert "trunk weights checksum mismatch" in run_with(bytes(flipped))
    flipped = bytearray(image)
    offset, length = where["experts.bin"]
    data_offset = struct.unpack_from("<" + expert_image.HEADER_FMT, image, offset)[12]
    for at in range(offset + data_offset + 100, offset + length, 4096):  # a byte of every record's pages
        flipped[at] ^= 1
    assert "failed its checksum" in run_with(bytes(flipped))


@pytest.mark.parametrize("options,what", [
    (dict(expert_bits=4, trunk_bits=8, max_seq=64), "flash image"),
    (dict(expert_bits=2, trunk_bits=4, max_seq=1024), "KV cache at --max-seq 1024"),
])
def test_a_model_the_board_cannot_hold_is_refused(tmp_path, options, what):
    with pytest.raises(BoardFitError, match=what):
        compile_model(TRAINED_MODEL, tmp_path / "art", CompileOptions(target=BOARD, **options), log=lambda m: None)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("board", [BOARD, "mps2-an500"], ids=["m55", "m7"])
def test_a_float16_kv_cache_holds_a_context_float32_cannot(board, trained_model, tokenizer, tmp_path):
    """At --max-seq 512 a float32 KV cache (3 MiB) does not fit beside the trunk in the board's 4 MiB of
    SRAM, and the refusal names --kv-cache float16; with it the firmware runs, its tokens the reference's
    (the board's kernels reading float16 rows: Helium on the M55, the FPv5 conversions on the M7)."""
    options = dict(target=board, expert_bits=4, trunk_bits=4, max_seq=512)
    with pytest.raises(BoardFitError, match="--kv-cache float16"):
        compile_model(TRAINED_MODEL, tmp_path / "f32", CompileOptions(**options), log=lambda m: None)
    art = tmp_path / "f16"
    manifest = compile_model(TRAINED_MODEL, art, CompileOptions(kv_cache="float16", **options), log=lambda m: None)
    assert manifest["kv_cache"] == "float16"
    elf = build_firmware(art, REPO_ROOT / "build" / f"firmware-{board}-kv16")
    ids = tokenizer.encode(PROMPTS[0]).ids
    report = run_firmware(elf, art, ["--tokens", ",".join(map(str, ids)), "-n", str(N_NEW)])
    want, _ = ReferenceExecutor(artifact_model(trained_model, art), 512).greedy(ids, N_NEW)
    assert report["tokens"] == want
