// TEMP stub so the CUDA build links; replaced by the real kernel at merge.
