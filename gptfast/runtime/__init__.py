"""What gptfast needs of the machine it runs on: device and dtype names, CUDA-error
handling, the cache directory, files written atomically, and the C++ extension's loader.

Below everything else of gptfast but the kernels: these modules know tensors, files and
processes, never models.
"""
