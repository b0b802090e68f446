"""``python -m sot_kernels.bench``: see :mod:`sot_kernels.bench` and
:mod:`sot_kernels.bench.cli`."""

from sot_kernels.bench.cli import main

if __name__ == "__main__":
    main()
