import subprocess
import sys

from conftest import ROOT


def test_core_imports_no_heavy_libraries():
    code = (
        "import sys, caslie_core, caslie_core.tasks, caslie_core.records, caslie_core.prompts, "
        "caslie_core.enrichment, caslie_core.metrics, caslie_core.config, caslie_core.synthetic, "
        "caslie_core.tiny_models, caslie_core.errors\n"
        "print(' '.join(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
