"""Prompt cleaning equals Open-Sora 1.2's `text_preprocessing` (the function upstream's inference applies)."""

import ast
import os
from pathlib import Path

import pytest

from duca_video.io.captions import clean_caption, clean_prompt

NASTY = [
    "A Red Panda eating bamboo",
    "A red panda eating bamboo. aesthetic score: 6.5. motion score: 10.0.",
    "Visit https://example.com/cat.png or www.shop.ru/item for <b>FREE shipping</b>!!! @seller",
    "this-is-my-cute-cat_in_the_garden",
    "“Quoted” ‘single’ «angle» text — with dashes – and ... ellipses",
    "A cat &amp; a dog &quot;playing&quot; on 192.168.0.1 page 12 #123 #123456 1234567",
    "图片 a dragon 龙 flying over mountains, 4k, 1920x1080",
    "jc6640 jc6640vc 6640vc231 j2d1a2a3 CLICK for more, download free",
    "'wrapped in quotes'",
    "   spaces   and\\nnewlines\n  ",
    "***AUSVERKAUFT*** [sale] {big} (now) | a/b \\ c",
    "a%20b+c and caf\u00e9 mojibake Ã©",
    "-leading and trailing:",
    "a large red circle moving left on a dark background",
]


def test_cleaning_without_upstream():
    assert clean_prompt("A Red Panda eating bamboo") == "a red panda eating bamboo"
    assert "http" not in clean_prompt("a cat https://example.com/x.png sleeping")
    assert clean_prompt("a large red circle moving left on a dark background") == (
        "a large red circle moving left on a dark background"
    )
    assert clean_caption("<p>HTML</p> text") == "html text"


def _upstream_cleaner(root: Path):
    """Upstream's cleaning functions, taken out of its t5.py without importing the module (which needs the
    whole of Open-Sora and ColossalAI's shardformer)."""
    source = (root / "opensora" / "models" / "text_encoder" / "t5.py").read_text()
    tree = ast.parse(source)
    wanted = {"basic_clean", "clean_caption", "text_preprocessing", "BAD_PUNCT_REGEX"}

    def wanted_node(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name in wanted
        return isinstance(node, ast.Assign) and any(getattr(t, "id", None) in wanted for t in node.targets)

    keep = [node for node in tree.body if wanted_node(node)]
    namespace: dict = {}
    exec("import html, re, ftfy", namespace)  # noqa: S102 - upstream's own code, read from the user's checkout
    exec(compile(ast.Module(body=keep, type_ignores=[]), "upstream_t5", "exec"), namespace)  # noqa: S102
    return namespace["text_preprocessing"]


def test_cleaning_equals_upstream_text_preprocessing():
    root = os.environ.get("OPEN_SORA_ROOT")
    if not root or not (Path(root) / "opensora" / "models" / "text_encoder" / "t5.py").is_file():
        pytest.skip("OPEN_SORA_ROOT is not set to an Open-Sora v1.2.0 checkout: upstream comparison skipped")
    upstream = _upstream_cleaner(Path(root))
    for prompt in NASTY:
        assert clean_prompt(prompt) == upstream(prompt), prompt


def test_the_pipeline_sends_the_cleaned_prompt_to_the_encoder(tmp_path, capsys):
    # The real path: the CLI's records show what the text encoder saw.
    import json
    import runpy

    root = Path(__file__).resolve().parents[1]
    main = runpy.run_path(str(root / "scripts" / "inference.py"), run_name="inference_cli")["main"]
    base = ["--config", str(root / "configs" / "tiny.py"), "--num-sampling-steps", "2", "--quiet", "--no-count-flops"]
    prompt = "A Large RED Circle moving left on a dark background <b>!</b>"
    assert main([*base, "--prompt", prompt, "--save-dir", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "sample_0000.json").read_text())
    assert record["prompt"] == prompt and record["text"] == "a large red circle moving left on a dark background !"
    assert main([*base, "--prompt", prompt, "--save-dir", str(tmp_path / "b"), "--no-clean-prompts"]) == 0
    assert json.loads((tmp_path / "b" / "sample_0000.json").read_text())["text"] == prompt
    capsys.readouterr()
    assert main([*base, "--prompt", "jc6640 https://shop.com", "--save-dir", str(tmp_path / "c")]) == 2
    assert "empty after Open-Sora's prompt cleaning" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.mp4"))
