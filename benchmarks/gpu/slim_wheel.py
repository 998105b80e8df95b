"""Drops the bitsandbytes native libraries a CUDA 12.6-13.x machine never loads from its wheel, in place.

bitsandbytes picks `libbitsandbytes_cuda<torch.version.cuda>.so` (or the CPU one); the wheel carries every CUDA
11.8-13.2, ROCm and XPU build (43 MB). Keeping CUDA 12.6, 12.8, 13.0, 13.2 and the CPU library saves about a third
of the 64 MiB a device call may carry. RECORD is rewritten to match, so pip installs the slimmed wheel normally.

    python benchmarks/gpu/slim_wheel.py .whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
"""

import os
import re
import sys
import zipfile


DROP = re.compile(r"bitsandbytes/libbitsandbytes_(cuda11\d|cuda12[0-4]|rocm\d+|xpu\d+)\.so$")


def slim(path):
    temporary = path + ".slim"
    dropped = []
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if DROP.search(info.filename):
                dropped.append(info.filename)
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not DROP.search(line.split(",")[0])).encode()
            target.writestr(info, data)
    before, after = os.path.getsize(path), os.path.getsize(temporary)
    os.replace(temporary, path)
    print(
        f"{os.path.basename(path)}: dropped {len(dropped)} libraries, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    for wheel in sys.argv[1:]:
        slim(wheel)
