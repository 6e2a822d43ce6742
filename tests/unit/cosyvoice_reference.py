"""Where the upstream-made CosyVoice fixtures are (README there: what each file holds):
`shared/reference/cosyvoice` beside the repository (the team's shared folder), or the
folder `$COSYVOICE_REFERENCE` names. Tests that need them skip, saying where they looked,
when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REF = Path(os.environ.get("COSYVOICE_REFERENCE",
                          Path(__file__).resolve().parents[3] / "shared" / "reference" / "cosyvoice"))
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"no CosyVoice reference fixtures at {REF}")
