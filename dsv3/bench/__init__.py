"""`dsv3 bench`: kernels timed at the DeepSeek-V3 shapes beside their peers and the measured roofline.

Only torch and the backend interface are used here (no vendor module): the
backend under test is built through dsv3.backends.registry.create_backend.

Each op's module (gemm.py, moe.py, mla.py) has
`run(backend, quick=False, reference=True) -> list[common.Record]`; the command
measures the roofline once, calls the modules, then `common.finish` fills in the
peer ratios and the percent of roofline, and `common.format_table` prints them.
"""
