"""Scenarios: what a cell measures. `load_all()` imports (and so registers) every scenario; the
package itself imports nothing heavy, so config checks stay torch-free."""


def load_all() -> dict:
    from pipeline.scenarios import decode, kernel, quality  # noqa: F401
    from pipeline.scenarios.base import SCENARIOS

    return SCENARIOS
