"""The README's RoSA snippet and examples/ run as a user would run them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_loop_example(tmp_path):
    result = run([str(ROOT / "examples" / "train_loop.py")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reloaded adapter matches: True" in result.stdout
    assert "merged model is plain PyTorch: True" in result.stdout


def test_readme_python_snippets_run(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(snippets) >= 2
    for number, code in enumerate(snippets):
        script = tmp_path / f"snippet_{number}.py"
        script.write_text(code)
        result = run([str(script)], tmp_path)
        assert result.returncode == 0, f"README snippet {number} failed:\n{code}\n{result.stderr}"
    assert (tmp_path / "rosa_adapter" / "adapter_config.json").is_file()
