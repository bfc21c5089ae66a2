"""``python -m onnxopt``: the command line."""

from onnxopt.cli import main

raise SystemExit(main())
