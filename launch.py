#!/usr/bin/env python
"""lift3d launcher: ``python launch.py --config configs/tiny/dreamfusion.yaml --train prompt="a red cube"``."""

from lift3d.launch import main

if __name__ == "__main__":
    main()
