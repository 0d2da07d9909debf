#!/usr/bin/env bash
# Run HERE (the development machine, which has network), once per checkout, before a session's
# first `device` call: puts the wheels the GPU machine lacks and ../shared/tools/device-env.sh
# into the ignored folder .whl/, which every call then names in `carry`.
# See ../shared/DEVICE.md and tools/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
# .whl/ is in .gitignore (no .git/info/exclude edit: in a worktree .git is a file).
mkdir -p .whl
rm -f .whl/*.whl
# The versions uv.lock pins (hydra-core 1.3 needs antlr4 4.9, not the newest).
pinned() {
    for name in "$@"; do
        version=$(grep -A1 "^name = \"$name\"$" uv.lock | sed -n 's/^version = "\(.*\)"/\1/p')
        echo "$name==${version:?$name is not in uv.lock}"
    done
}
# webdataset + braceexpand: forge-data's shard reader (forge-train's data=vlm-shards, session.sh's
# vlm part); the rest of the VLM path's needs (pillow, tokenizers, jinja2, tqdm, numpy) are on the
# GPU machine's image, and nothing there imports torchvision or (outside data=skimage-captions)
# scikit-image.
# shellcheck disable=SC2046
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl \
    $(pinned hydra-core omegaconf webdataset braceexpand)
# antlr4-python3-runtime 4.9.3 is published as a source archive only: build its (pure-Python)
# wheel here.
python3 -m pip wheel --quiet --no-deps -w .whl $(pinned antlr4-python3-runtime)
# Liger-Kernel (pure Python + Triton): the kernel benchmarks' and forge-bench's peer, at the
# version uv.lock pins for forge-bench's `peers` extra.
liger=$(pinned liger-kernel)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .whl "$liger" \
    || echo "$liger: not downloaded (its rows will say skipped)"
cp ../shared/tools/device-env.sh .whl/device-env.sh
du -sh .whl
