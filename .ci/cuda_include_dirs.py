"""Prints the include folders of the pip-installed CUDA libraries, joined by os.pathsep.

ATen's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers, which the pip CUDA wheels
keep under site-packages/nvidia rather than in CUDA_HOME: nvidia/cu13/include for CUDA 13
wheels, one folder per library for CUDA 12 wheels. Run it with the interpreter that builds.
"""

import glob
import os
import site

dirs = []
for root in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", "include")))
    for lib in ("cublas", "cusparse", "cusolver", "cuda_runtime"):
        dirs.append(os.path.join(root, "nvidia", lib, "include"))
print(os.pathsep.join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))
