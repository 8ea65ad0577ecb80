"""The cost formula of `hutch.pricing`, on both bases."""

from __future__ import annotations

import pytest

from hutch.config import ServerConfig
from hutch.metadb.records import UsageAmounts
from hutch.pricing import Pricing, cost

AMOUNTS = UsageAmounts(
    active_s=100.0,
    idle_s=900.0,
    cpu_s=40.0,
    cpu_active_s=38.0,
    memory_gib_s=50.0,
    memory_active_gib_s=10.0,
    vcpu_active_s=200.0,  # 2 vCPUs
    vcpu_idle_s=1800.0,
    memory_alloc_active_gib_s=100.0,  # 1 GiB
    memory_alloc_idle_gib_s=900.0,
    disk_gib_s=3000.0,
)


def test_by_default_idle_cpu_is_free_and_idle_memory_costs_a_tenth_of_the_allocation():
    price = cost(AMOUNTS, Pricing(vcpu_second=1.0, memory_gib_second=0.01, disk_gib_second=0.001))
    assert price.cpu == pytest.approx(200.0)
    assert price.memory == pytest.approx(0.01 * (100.0 + 0.1 * 900.0))
    assert price.disk == pytest.approx(3.0)
    assert price.total == pytest.approx(200.0 + 1.9 + 3.0)


def test_the_used_basis_bills_what_the_cgroup_measured():
    pricing = Pricing(vcpu_second=1.0, memory_gib_second=0.01, disk_gib_second=0.0, idle_cpu_factor=0.5, basis="used")
    price = cost(AMOUNTS, pricing)
    assert price.cpu == pytest.approx(38.0 + 0.5 * 2.0)
    assert price.memory == pytest.approx(0.01 * (10.0 + 0.1 * 40.0))


def test_the_cost_of_a_sum_is_the_sum_of_the_costs():
    pricing = Pricing()
    double = UsageAmounts().add(AMOUNTS).add(AMOUNTS)
    assert cost(double, pricing).total == pytest.approx(2 * cost(AMOUNTS, pricing).total)


def test_pricing_is_read_from_the_toml_config(tmp_path):
    path = tmp_path / "hutch.toml"
    path.write_text('[pricing]\ncurrency = "EUR"\nvcpu_second = 0.00002\nidle_memory_factor = 0.2\n')
    config = ServerConfig.load(path)
    assert config.pricing.currency == "EUR" and config.pricing.vcpu_second == 0.00002
    assert config.pricing.idle_memory_factor == 0.2 and config.pricing.idle_cpu_factor == 0.0
    assert config.metering.sample_interval == 5.0
