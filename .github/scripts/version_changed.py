#!/usr/bin/env python3
"""Whether a push changed pyproject.toml's [project] version: the publish workflow's gate.

    python3 .github/scripts/version_changed.py EVENT BEFORE_SHA  >> "$GITHUB_OUTPUT"

Prints ``changed=true`` or ``changed=false`` (and ``version=X.Y.Z``) for GitHub's step outputs;
the reason goes to stderr. A manual run (EVENT ``workflow_dispatch``), a first push (BEFORE all
zeros) and a BEFORE commit without a readable version all count as changed: publishing a
version the registry already has fails there, loudly, instead of being skipped here in silence.
"""
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def version_of(text):
    return tomllib.loads(text).get("project", {}).get("version")


def decide(event, before, current_text, show_before):
    """(changed, version, reason). ``show_before()`` returns the old pyproject.toml text or
    raises OSError/CalledProcessError when it cannot be had."""
    version = version_of(current_text)
    if not version:
        raise SystemExit("pyproject.toml has no [project] version: nothing to publish")
    if event == "workflow_dispatch":
        return True, version, "started by hand"
    if not before or set(before) == {"0"}:
        return True, version, "no previous commit to compare with"
    try:
        old = version_of(show_before())
    except (OSError, subprocess.CalledProcessError, tomllib.TOMLDecodeError) as e:
        return True, version, f"previous pyproject.toml unreadable ({e})"
    if old == version:
        return False, version, f"version {version} unchanged"
    return True, version, f"version {old} -> {version}"


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    event, before = argv[1], argv[2]
    with open("pyproject.toml", encoding="utf-8") as f:
        current = f.read()

    def show_before():
        return subprocess.run(["git", "show", f"{before}:pyproject.toml"], check=True,
                              capture_output=True, text=True).stdout

    changed, version, reason = decide(event, before, current, show_before)
    print(f"publish: {reason}", file=sys.stderr)
    print(f"changed={'true' if changed else 'false'}")
    print(f"version={version}")


if __name__ == "__main__":
    main(sys.argv)
