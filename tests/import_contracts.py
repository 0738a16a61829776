"""import-linter contract types the built-in ones cannot express (used by `lint-imports`, see pyproject.toml)."""

from __future__ import annotations

import sys

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class AllowedImportsContract(Contract):
    """Every module of `source` imports only the standard library, `source` itself and `allowed`
    packages: an allowlist, where the built-in `forbidden` contract is a denylist that a new
    dependency slips past. Needs `include_external_packages = true`."""

    type_name = "allowed_imports"

    source = fields.StringField()
    allowed = fields.SetField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        source = str(self.source)
        allowed = {source, *map(str, self.allowed), *sys.stdlib_module_names}
        found = []
        for module in sorted({source} | graph.find_descendants(source)):
            for imported in sorted(graph.find_modules_directly_imported_by(module)):
                if imported.split(".")[0] not in allowed:
                    lines = [d["line_number"] for d in graph.get_import_details(importer=module, imported=imported)]
                    found.append((module, imported, lines))
        return ContractCheck(kept=not found, warnings=[], metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, imported, lines in check.metadata["found"]:
            output.print_error(f"{module} imports {imported} (l. {', '.join(map(str, lines))})", bold=False)
