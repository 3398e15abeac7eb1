"""config/README.md documents exactly the keys of the schema, with the schema's defaults."""

import re

import yaml

PLACEHOLDERS = {"tasks": "<T>", "models": "<M>"}


def schema_keys(schema):
    """{dotted key: default or None} of every leaf key (objects with properties contribute their children)."""
    definitions = schema["definitions"]
    keys = {}

    def walk(node, prefix):
        if "$ref" in node:
            node = definitions[node["$ref"].split("/")[-1]]
        properties = node.get("properties")
        if properties:
            for name, child in properties.items():
                walk(child, f"{prefix}.{name}" if prefix else name)
            return
        additional = node.get("additionalProperties")
        if isinstance(additional, dict) and ("$ref" in additional or "properties" in additional):
            walk(additional, f"{prefix}.{PLACEHOLDERS.get(prefix, '<name>')}")
            return
        keys[prefix] = node.get("default")

    walk(schema, "")
    return keys


def documented_keys(readme):
    """{dotted key: default text} from the README's key table; `a.b` / `c` / `d` rows name a.b, a.c, a.d."""
    keys = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = [part.strip() for part in cells[1].split(" / ")]
        prefix = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        for position, name in enumerate(names):
            full = name if position == 0 or "." in name else f"{prefix}.{name}"
            keys[full] = defaults[position] if len(defaults) == len(names) else cells[1]
    return keys


def test_readme_documents_every_schema_key_and_no_other(repo):
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (repo / "config" / "README.md").read_text()
    in_schema, in_readme = set(schema_keys(schema)), set(documented_keys(readme))
    assert not in_schema - in_readme, f"schema keys missing from config/README.md: {sorted(in_schema - in_readme)}"
    assert not in_readme - in_schema, f"config/README.md keys not in the schema: {sorted(in_readme - in_schema)}"


def test_readme_defaults_are_the_schema_defaults(repo):
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    documented = documented_keys((repo / "config" / "README.md").read_text())
    wrong = {}
    for key, default in schema_keys(schema).items():
        if isinstance(default, (bool, int, float, str)) and key in documented:
            text = documented[key].strip("`")
            expected = {True: "true", False: "false"}.get(default, default) if isinstance(default, bool) else default
            if isinstance(expected, (int, float)) and not isinstance(expected, bool):
                ok = re.fullmatch(r"[-+0-9.e]+", text) is not None and float(text) == float(expected)
            else:
                ok = text == str(expected) or (expected == "" and text in ('""', "''"))
            if not ok:
                wrong[key] = (documented[key], default)
    assert not wrong, f"config/README.md default differs from the schema's: {wrong}"
