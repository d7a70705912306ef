"""The dense CRF: ``refiner`` (``dense_crf`` and ``Refiner``, the one interface, which chooses the backend),
``parameters`` (STEGO's kernels and iterations, the backends' names), ``pydensecrf_backend`` (the protocol's C++
CRF), ``pool`` (worker processes for it), ``lattice`` (the same CRF in PyTorch on a permutohedral lattice, CPU or
GPU). Nothing is imported here, so that the options can read ``parameters`` without torch."""
