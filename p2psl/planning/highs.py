"""A thin layer over highspy: linear expressions, a model built in Python and passed to HiGHS
in one go, and a runner that solves it repeatedly (the planner's lexicographic stages).

HiGHS is configured to be silent and deterministic: one thread, a fixed random seed, presolve
off (on these small models it costs more than it saves), and optimality gaps far below the
planner's tie tolerance.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from p2psl.errors import PlanError

_banner_done = False


def new_highs():
    """A silent HiGHS instance. The first one in a process prints a banner to file descriptor 1
    that `silent()` cannot stop; it goes to /dev/null so `p2psl plan --json` stays clean."""
    global _banner_done
    import highspy

    if _banner_done:
        return _configure(highspy.Highs())
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
            _flush_c_stdout()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _banner_done = True
    return _configure(h)


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _configure(h):
    for name, value in (("output_flag", False), ("threads", 1), ("random_seed", 0),
                        ("mip_rel_gap", 1e-9), ("mip_abs_gap", 1e-9), ("presolve", "off")):
        h.setOptionValue(name, value)
    return h


class Lin:
    """A linear expression: {column: coefficient} plus a constant."""

    __slots__ = ("const", "terms")

    def __init__(self, terms: dict[int, float] | None = None, const: float = 0.0):
        self.terms = dict(terms or {})
        self.const = const

    def add(self, other: Lin | int, scale: float = 1.0) -> Lin:
        """self += scale · other (a Lin or a column index); returns self."""
        if isinstance(other, Lin):
            for col, coef in other.terms.items():
                self.terms[col] = self.terms.get(col, 0.0) + scale * coef
            self.const += scale * other.const
        else:
            self.terms[other] = self.terms.get(other, 0.0) + scale
        return self


def lin(*parts: tuple[float, Lin | int], const: float = 0.0) -> Lin:
    """Σ scale · part + const, for parts that are expressions or column indices."""
    out = Lin(const=const)
    for scale, part in parts:
        out.add(part, scale)
    return out


class Model:
    """Columns and rows collected in Python, then passed to HiGHS in one go."""

    def __init__(self):
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[float, float, dict[int, float]]] = []

    def var(self, lo: float = 0.0, hi: float = 1.0, integer: bool = True) -> int:
        self.lower.append(lo)
        self.upper.append(hi)
        self.integer.append(1 if integer else 0)
        return len(self.lower) - 1

    def row(self, expr: Lin, lo: float = -np.inf, hi: float = np.inf) -> None:
        """lo ≤ expr ≤ hi."""
        terms = {c: v for c, v in expr.terms.items() if v != 0.0}
        self.rows.append((lo - expr.const, hi - expr.const, terms))

    def le(self, left: Lin, right: Lin) -> None:
        self.row(lin((1, left), (-1, right)), hi=0.0)

    def to_highs(self):
        import highspy

        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.lower), len(self.rows)
        lp.col_cost_ = np.zeros(lp.num_col_)
        lp.col_lower_, lp.col_upper_ = np.array(self.lower), np.array(self.upper)
        lp.row_lower_ = np.array([r[0] for r in self.rows])
        lp.row_upper_ = np.array([r[1] for r in self.rows])
        starts, index, value = [0], [], []
        for _, _, terms in self.rows:
            for col in sorted(terms):
                index.append(col)
                value.append(terms[col])
            starts.append(len(index))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = starts, index, value
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in self.integer]
        h = new_highs()
        h.passModel(lp)
        return h


class Runner:
    """One model in HiGHS, solved again and again with different objectives and added rows;
    each solve starts from the previous solution (or a hint)."""

    def __init__(self, model: Model, hint: dict[int, float] | None = None):
        self.h = model.to_highs()
        self.n_cols = len(model.lower)
        self.hint = hint
        self.x: np.ndarray | None = None

    def _objective(self, expr: Lin) -> None:
        cost = np.zeros(self.n_cols)
        for col, coef in expr.terms.items():
            cost[col] = coef
        self.h.changeColsCost(self.n_cols, np.arange(self.n_cols, dtype=np.int32), cost)

    def relaxation(self, expr: Lin) -> tuple[float, np.ndarray]:
        """The LP relaxation's optimum of `expr` and the reduced costs (primal simplex, the
        fastest on these models); -inf when the relaxation has no optimum."""
        self._objective(expr)
        self.h.setOptionValue("solve_relaxation", True)
        self.h.setOptionValue("simplex_strategy", 4)
        self.h.run()
        self.h.setOptionValue("solve_relaxation", False)
        self.h.setOptionValue("simplex_strategy", 1)
        if self.h.modelStatusToString(self.h.getModelStatus()) != "Optimal":
            return -np.inf, np.zeros(self.n_cols)
        return self.h.getInfo().objective_function_value + expr.const, np.array(self.h.getSolution().col_dual)

    def minimise(self, expr: Lin) -> bool:
        """Solve with `expr` as the objective; False when infeasible. Anything but an optimum
        or infeasibility raises PlanError: the planner never falls back silently."""
        self._objective(expr)
        if self.x is not None:
            self.h.setSolution(self.n_cols, np.arange(self.n_cols, dtype=np.int32), self.x)
        elif self.hint is not None:
            cols = np.array(sorted(self.hint), dtype=np.int32)
            self.h.setSolution(len(cols), cols, np.array([self.hint[c] for c in cols]))
        self.h.run()
        status = self.h.modelStatusToString(self.h.getModelStatus())
        if status == "Solve error":  # HiGHS may reject its own optimum by a tolerance: once more, cold
            self.h.clearSolver()
            self.h.run()
            status = self.h.modelStatusToString(self.h.getModelStatus())
        if status == "Infeasible":
            return False
        if status != "Optimal":
            raise PlanError(f"the planner's MILP solver stopped: {status}")
        self.x = np.array(self.h.getSolution().col_value)
        return True

    def hold(self, expr: Lin, limit: float) -> None:
        """Add expr ≤ limit for the following solves."""
        terms = {c: v for c, v in expr.terms.items() if v != 0.0}
        cols = np.array(sorted(terms), dtype=np.int32)
        self.h.addRow(-np.inf, limit - expr.const, len(cols), cols, np.array([terms[c] for c in cols]))

    def value(self, expr: Lin) -> float:
        """expr at the last solution."""
        return expr.const + sum(coef * self.x[col] for col, coef in expr.terms.items())
