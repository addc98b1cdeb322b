"""Prints the CUDA architectures to build for when the user named none, in TORCH_CUDA_ARCH_LIST
syntax: "visible 8.0;9.0" (the GPUs this machine sees) or "torch 7.5;8.0;9.0;10.0" (what the
installed torch was built for). Used by cmake/rosa_cuda_archs.cmake."""

import torch

if torch.cuda.is_available():
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    print("visible", ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities)))
else:
    names = [name[3:] for name in torch.cuda.get_arch_list() if name.startswith("sm_") and name[3:].isdigit()]
    capabilities = {(int(name[:-1]), int(name[-1])) for name in names}
    print("torch", ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities)))
