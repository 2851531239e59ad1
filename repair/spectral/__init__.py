"""The linear algebra of intruder detection: base spectra, solvers for the tuned top-k, certificates.

- ``linalg``: SVD with fixed signs, effective rank, low-rank norms.
- ``spectra``: complete base spectra (the exact path) and the cache of base spectra, full or truncated.
- ``topk``: the exact paths: the structured top-k from a complete base basis, and the dense SVD.
- ``krylov``: block Krylov eigensolvers and Lanczos quadrature for symmetric operators.
- ``truncated``: the top-p base triplets from a block Krylov solver.
- ``certified``: the tuned top-k from products with W0, B and A, and certified bounds on max|cos|.
"""
