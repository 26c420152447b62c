"""Gradient-masking sanity checks on a finished attack suite (Athalye et al. 2018; Carlini et al. 2019).

A model that only *looks* robust (masked, shattered or noisy gradients) gives itself away: accuracy that
rises with more PGD steps or a larger eps, iterative PGD weaker than one FGSM step, or AutoAttack (with
its gradient-free Square stage) far below PGD on the same samples. Each failed check is one warning line;
they are printed with the results and stored in the JSON. Comparisons use the same samples on both sides.
"""
from __future__ import annotations


def _acc(row, n=None) -> float:
    ok = row["per_sample"] if n is None else row["per_sample"][:n]
    return 100.0 * float(ok.float().mean()) if len(ok) else float("nan")


def _label(row) -> str:
    if row["norm"] == "linf" and row["eps"] is not None:
        return f"{row['attack'].upper()}-{row['params'].get('steps')} eps={row['eps'] * 255:g}/255"
    return f"{row['attack'].upper()}-{row['params'].get('steps')} L2 eps={row['eps']:g}"


def masking_checks(rows: list[dict], *, main_steps: int, tol: float = 0.0, aa_gap: float = 5.0) -> list[str]:
    """Warnings (empty when every check passes). tol and aa_gap are in accuracy points (percent)."""
    warnings = []
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    adversarial = [r for r in rows if r["attack"] in ("fgsm", "pgd", "cw-l2", "autoattack") and r["n"]]
    if clean is not None:
        for r in adversarial:
            if _acc(r) > _acc(clean, r["n"]) + tol:
                warnings.append(f"{r['attack']} accuracy {_acc(r):.2f}% is above clean {_acc(clean, r['n']):.2f}%")
    for norm in ("linf", "l2"):
        main = sorted((r for r in rows if r["attack"] == "pgd" and r["norm"] == norm
                       and r["params"]["steps"] == main_steps), key=lambda r: r["eps"])
        for small, big in zip(main, main[1:]):
            if _acc(big) > _acc(small) + tol:
                warnings.append(f"accuracy rises with eps: {_label(big)} {_acc(big):.2f}% > "
                                f"{_label(small)} {_acc(small):.2f}% (possible gradient masking)")
    linf = [r for r in rows if r["attack"] == "pgd" and r["norm"] == "linf"]
    if linf:
        top = max(r["eps"] for r in linf)
        sweep = sorted((r for r in linf if r["eps"] == top), key=lambda r: r["params"]["steps"])
        for few, many in zip(sweep, sweep[1:]):
            if _acc(many) > _acc(few) + tol:
                warnings.append(f"accuracy rises with more PGD steps: {_label(many)} {_acc(many):.2f}% > "
                                f"{_label(few)} {_acc(few):.2f}% (possible gradient masking)")
    for f in (r for r in rows if r["attack"] == "fgsm"):
        p = next((r for r in linf if r["eps"] == f["eps"] and r["params"]["steps"] == main_steps), None)
        if p is not None and _acc(p) > _acc(f) + tol:
            warnings.append(f"PGD weaker than FGSM: {_label(p)} {_acc(p):.2f}% > FGSM eps={f['eps'] * 255:g}/255 "
                            f"{_acc(f):.2f}% (possible gradient masking)")
    for a in (r for r in rows if r["attack"] == "autoattack" and r["n"]):
        p = next((r for r in linf if abs(r["eps"] - a["eps"]) < 1e-9 and r["params"]["steps"] == main_steps), None)
        if p is not None and _acc(p, a["n"]) - _acc(a) > aa_gap:
            warnings.append(f"AutoAttack {_acc(a):.2f}% is {_acc(p, a['n']) - _acc(a):.1f} points below "
                            f"{_label(p)} {_acc(p, a['n']):.2f}% on the same {a['n']} samples: PGD overestimates "
                            f"robustness (possible gradient masking)")
    return warnings
