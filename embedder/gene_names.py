"""Gene names a user types that a model does not know: close spellings and common aliases.

``ALIASES`` maps a few names pathologists use every day (protein, antibody or older gene names) to the
HGNC-approved symbol that spatial transcriptomics tables use. The pairs are HGNC's "alias symbol" and
"previous symbol" entries (https://www.genenames.org), chosen for H&E / breast-cancer work; the table is
small on purpose and only suggests, it never renames a column.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

ALIASES = {
    "HER2": "ERBB2", "HER-2": "ERBB2", "NEU": "ERBB2", "CD340": "ERBB2", "HER1": "EGFR", "HER3": "ERBB3",
    "HER4": "ERBB4", "ER": "ESR1", "ERA": "ESR1", "ER-ALPHA": "ESR1", "ERALPHA": "ESR1", "PR": "PGR",
    "KI67": "MKI67", "KI-67": "MKI67", "MIB1": "MKI67", "P53": "TP53", "CD45": "PTPRC", "PD-L1": "CD274",
    "PDL1": "CD274", "PD-1": "PDCD1", "PD1": "PDCD1", "CK5": "KRT5", "CK7": "KRT7", "CK8": "KRT8",
    "CK14": "KRT14", "CK17": "KRT17", "CK18": "KRT18", "CK19": "KRT19", "E-CADHERIN": "CDH1",
    "ECAD": "CDH1", "VIMENTIN": "VIM", "SMA": "ACTA2", "ALPHA-SMA": "ACTA2", "CD31": "PECAM1",
    "CD3": "CD3E", "CD8": "CD8A", "CD20": "MS4A1", "CD11B": "ITGAM", "CD11C": "ITGAX", "HLA-DR": "HLA-DRA",
    "CYCLIN-D1": "CCND1", "CYCLIND1": "CCND1", "TROP2": "TACSTD2", "BCL-2": "BCL2", "C-MYC": "MYC",
}


def gene_suggestions(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``known`` the user may have meant by ``name``: its HGNC symbol when ``name`` is an
    alias, the same name in another case, then the closest spellings (at most ``n`` in all)."""
    known = [str(g) for g in known]
    by_upper = {g.upper(): g for g in known}
    found = []
    symbol = ALIASES.get(name.upper())
    if symbol and symbol in by_upper:
        found.append(by_upper[symbol])
    if name.upper() in by_upper:
        found.append(by_upper[name.upper()])
    found += [by_upper[c] for c in difflib.get_close_matches(name.upper(), list(by_upper), n=n, cutoff=0.75)]
    return list(dict.fromkeys(found))[:n]


def unknown_gene_message(option: str, name: str, known: Iterable[str], where: str) -> str:
    """``{option} NAME is not in {where}`` with what the user may have meant (aliases, close names)."""
    known = list(known)
    symbol = ALIASES.get(name.upper())
    suggestions = gene_suggestions(name, known)
    text = f"{option} {name!r} is not in {where} ({len(known)} genes)"
    if symbol and symbol in suggestions:
        return f"{text}; {name} is an alias of {symbol}: use {option} {symbol}"
    if suggestions:
        return f"{text}; did you mean {' or '.join(suggestions)}?"
    if symbol:
        return f"{text}; {name} is an alias of {symbol}, which is not there either"
    return f"{text}, e.g. {', '.join(known[:5])}"
