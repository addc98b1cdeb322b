#!/usr/bin/env bash
# Lists the GPU code in a built extension: cubins (SASS) per architecture and PTX per target.
#   bash scripts/list_cuda_archs.sh path/to/_C.so
set -euo pipefail
so=$1
echo "SASS (cuobjdump --list-elf):"
cuobjdump --list-elf "$so" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\..*/  \1/p' | sort | uniq -c
echo "PTX (cuobjdump --list-ptx):"
cuobjdump --list-ptx "$so" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\..*/  \1/p' | sort | uniq -c
