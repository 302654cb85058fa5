#!/usr/bin/env bash
# usage: bash scripts/structure_numbers.sh [TREE]  -- structural numbers of a checkout (issue 28): probes of the
# model outside models/, functions below the top taking the whole Config, lines of features/, the fullest folder
cd "${1:-.}"
echo "probes of the model outside models/ (getattr/hasattr naming model/parts.model/run.model):"
grep -rnE "(getattr|hasattr)\((model|parts\.model|run\.model|self\.model|getattr\(model)" src/capnet --include=*.py | grep -v "^src/capnet/models/" | wc -l
echo "functions below experiment/serving/cli/plans taking the whole Config (typed Config or untyped cfg):"
python3 - <<'PY'
import ast, pathlib
n=0; names=[]
for p in pathlib.Path("src/capnet").rglob("*.py"):
    rel=str(p.relative_to("src/capnet"))
    if rel.startswith(("cli/","serving/")) or rel in ("experiment.py","config.py","plans.py"):
        continue
    tree=ast.parse(p.read_text())
    for node in ast.walk(tree):
        if isinstance(node,(ast.FunctionDef,ast.AsyncFunctionDef)):
            for a in node.args.args+node.args.kwonlyargs:
                ann=ast.unparse(a.annotation) if a.annotation else ""
                if ann in ("Config","'Config'","\"Config\"") or (a.arg=="cfg" and not ann):
                    names.append(f"{rel}:{node.name}"); break
print(len(names)); print("  "+"\n  ".join(sorted(names)))
PY
echo "lines of features/ (all, and without preflight.py):"; cat src/capnet/features/*.py | wc -l; ls src/capnet/features/*.py | grep -v preflight | xargs cat | wc -l
echo "lines of models/capnet.py:"; wc -l < src/capnet/models/capnet.py
echo "fullest folder (python files, lines):"; for d in $(find src/capnet -type d -not -name __pycache__); do echo "$(ls $d/*.py 2>/dev/null | wc -l) $(cat $d/*.py 2>/dev/null | wc -l) $d"; done | sort -k2 -n | tail -3
echo "tests collected:"; python -m pytest --collect-only -q -p no:cacheprovider 2>/dev/null | tail -1
