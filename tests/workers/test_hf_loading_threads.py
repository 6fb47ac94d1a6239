"""Hugging Face folders load from several threads of a fresh process at once (embedded mode: the
API thread registers a folder while the in-process worker loads one). transformers resolves its
classes lazily and not thread-safely; `loading.models` serialises that first access."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.language_models import causal_lm, save_folder

ROOT = Path(__file__).resolve().parents[2]


def test_concurrent_first_loads_of_hf_folders_all_succeed(tmp_path: Path) -> None:
    folders = [save_folder(causal_lm(arch), tmp_path / arch) for arch in ("gpt2", "llama", "qwen2")]
    script = textwrap.dedent(f"""
        import threading
        from pathlib import Path
        from loading.models import build_module
        folders = {[str(f) for f in folders]!r}
        barrier, errors, loaded = threading.Barrier(6), [], []
        def load(i):
            barrier.wait()
            try:
                module = build_module(Path(folders[i % 3]), "hf", "causal_lm", architecture=None, allowlist=[])
                loaded.append(type(module).__name__)
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(sorted(loaded), errors)
        assert not errors and len(loaded) == 6
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "GPT2LMHeadModel" in done.stdout and "LlamaForCausalLM" in done.stdout and "Qwen2ForCausalLM" in done.stdout
