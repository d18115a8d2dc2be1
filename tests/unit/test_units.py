

def test_plural_counts_one_apart():
    from p2psl.units import plural

    assert plural(1, "round") == "1 round"
    assert plural(3, "round") == "3 rounds"
    assert plural(0, "compute node") == "0 compute nodes"
    assert plural(1, "data owner") == "1 data owner"
    assert plural(2, "copy", "copies") == "2 copies"


def test_plan_table_says_one_compute_node_in_the_singular():
    from p2psl.learning.local_plan import plan_locally
    from p2psl.planning.table import format_plan
    from tests.helpers import make_topology

    topology = make_topology(["alice"], ["c1"])
    plan, _, _ = plan_locally(topology)
    text = format_plan(plan, None, topology)
    assert "1 compute node, 1 data owner," in text
