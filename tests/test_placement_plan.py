"""Placement logic without Ray: pools, colocation shares, feasibility."""
import pytest

from rayalign.cluster.placement import PlacementError, check_feasible, plan_pools, role_shares
from rayalign.config import GroupConfig


def g(**kw):
    return GroupConfig(**kw)


def test_colocated_roles_share_one_pool():
    roles = {"policy": g(workers=2, cpus_per_worker=1, gpus_per_worker=1),
             "reference": g(workers=2, cpus_per_worker=1, gpus_per_worker=1, colocate_with="policy"),
             "critic": g(workers=1, cpus_per_worker=2)}
    shares = role_shares(roles)
    assert shares["policy"] == ("policy", {"CPU": 0.5, "GPU": 0.5})
    assert shares["reference"] == ("policy", {"CPU": 0.5, "GPU": 0.5})
    assert shares["critic"] == ("critic", {"CPU": 2, "GPU": 0.0})
    pools = plan_pools(roles)
    assert set(pools) == {"policy", "critic"}
    assert pools["policy"].bundle == {"CPU": 1, "GPU": 1} and pools["policy"].workers == 2
    assert pools["policy"].roles == ["policy", "reference"]


def test_colocation_errors():
    with pytest.raises(PlacementError, match="unknown role 'ghost'"):
        role_shares({"a": g(colocate_with="ghost")})
    with pytest.raises(PlacementError, match="cycle"):
        role_shares({"a": g(colocate_with="b"), "b": g(colocate_with="a")})
    with pytest.raises(PlacementError, match="same number of workers"):
        role_shares({"a": g(workers=2), "b": g(workers=1, colocate_with="a")})


def test_feasibility_against_nodes():
    nodes = [{"CPU": 8, "GPU": 8}] * 8
    ok = plan_pools({"policy": g(workers=8, gpus_per_worker=1)})
    check_feasible(list(ok.values()), nodes)
    too_big = plan_pools({"policy": g(workers=2, gpus_per_worker=9)})
    with pytest.raises(PlacementError, match="no node offers one bundle"):
        check_feasible(list(too_big.values()), nodes)
    too_many = plan_pools({"policy": g(workers=65, gpus_per_worker=1)})
    with pytest.raises(PlacementError, match="do not fit"):
        check_feasible(list(too_many.values()), nodes)
    strict = plan_pools({"policy": g(workers=3, gpus_per_worker=4, placement="STRICT_PACK")})
    with pytest.raises(PlacementError, match="STRICT_PACK"):
        check_feasible(list(strict.values()), nodes)
    spread = plan_pools({"policy": g(workers=9, gpus_per_worker=1, placement="STRICT_SPREAD")})
    with pytest.raises(PlacementError, match="needs 9 nodes"):
        check_feasible(list(spread.values()), nodes)
    with pytest.raises(PlacementError, match="no alive nodes"):
        check_feasible(list(ok.values()), [])


def test_pipelines_place_colocated_roles_through_their_stage_layout():
    """Colocation is checked per stage with the roles `rayalign plan` lists; a role that names a
    role its stage does not start is refused before anything is placed."""
    from rayalign.config import ConfigError, Config
    from rayalign.pipelines.common import Layout, role_group, stage_layout

    cfg = Config.model_validate({"ppo": {"prompts": {"source": "packaged:mixed-prompts"},
                                         "policy": {"group": {"workers": 2, "cpus_per_worker": 1}},
                                         "critic": {"group": {"workers": 2, "colocate_with": "policy"}},
                                         "reference": {"workers": 2, "colocate_with": "policy"},
                                         "rewards": [{"type": "function", "function": "os:getcwd"}]}})
    with stage_layout(cfg, "ppo") as lay:
        assert set(lay.shares) >= {"policy", "critic", "reference"}
        assert {lay.shares[r][0] for r in ("policy", "critic", "reference")} == {"policy"}
        assert lay.planned["policy"].roles == ["policy", "critic", "reference"]
    bad = cfg.model_copy(deep=True)
    bad.ppo.critic.group.colocate_with = "actor"
    with pytest.raises(ConfigError, match="ppo: role 'critic': colocate_with names unknown role 'actor'"):
        with stage_layout(bad, "ppo"):
            pass
    # Outside a stage's layout (or for a role the stage does not list) colocation cannot happen.
    with pytest.raises(ConfigError, match="names no role that this stage starts with it"):
        with role_group("critic", object, cfg.ppo.critic.group):
            pass
    assert Layout({"a": GroupConfig()}).placed == {}
