"""``python -m kernels.bench``: see :mod:`kernels.bench` and :mod:`kernels.bench.cli`."""

from kernels.bench.cli import main

if __name__ == "__main__":
    main()
