"""`python -m pipeline.report`: build one report from the command line (pipeline/report/build.py).

    python -m pipeline.report --experiment attnbench [--sweep SWEEP_ID] [--out DIR] [--budget-gb 16]
"""
from pipeline.report.build import main

raise SystemExit(main())
