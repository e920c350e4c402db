"""The node's trust anchor cannot be replaced from its data directory
(edge_node.state.NodeStore.load_trust: TUF's root walk from the shipped list)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_node.state import NodeStore, PersistedState
from shared.envelope import SigningKey
from shared.errors import TrustFileError
from shared.trust import Role, TrustList, TrustStore, sign_trust_list

DAY_S = 86_400.0


class Root:
    """A root key and the lists it issues (every role held by one key, for brevity)."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()

    def issue(
        self, version: int, *, signers: list[SigningKey] | None = None, expires_in_s: float = DAY_S
    ) -> bytes:
        trust = TrustList.build(
            version=version,
            expires_at=time.time() + expires_in_s,
            roles={Role.ROOT: [self.key], Role.RELEASE: [self.key], Role.ROLLOUT: [self.key]},
        )
        return sign_trust_list(trust, signers or [self.key]).to_bytes()


def _rotate(store: NodeStore, shipped: Path, data: bytes) -> TrustStore:
    """What a node does with a trust update it accepted."""
    current = store.load_trust(shipped, now=time.time())
    rotated = current.rotate(TrustStore.anchor(data)._envelope, now=time.time())
    store.save_trust(rotated)
    state = store.load()
    store.save(state.model_copy(update={"trust_version": rotated.version,
                                        "trust_digest": rotated.digest}))  # fmt: skip
    return rotated


@pytest.fixture
def shipped(tmp_path: Path) -> tuple[Root, Path]:
    root = Root()
    path = tmp_path / "shipped-trust.json"
    path.write_bytes(root.issue(1))
    return root, path


def test_a_planted_list_is_ignored_however_new(tmp_path: Path, shipped: tuple[Root, Path]) -> None:
    _, path = shipped
    store = NodeStore(tmp_path / "data")
    attacker = Root()
    (tmp_path / "data" / "trust.json").write_bytes(attacker.issue(99))
    (tmp_path / "data" / "trust-chain.json").write_text(
        json.dumps([json.loads(attacker.issue(98))])
    )
    assert store.load_trust(path, now=time.time()).version == 1


def test_rotations_chain_and_a_planted_link_ends_the_walk(
    tmp_path: Path, shipped: tuple[Root, Path]
) -> None:
    root, path = shipped
    store = NodeStore(tmp_path / "data")
    new_root = Root()
    _rotate(store, path, new_root.issue(2, signers=[root.key, new_root.key]))
    assert _rotate(store, path, new_root.issue(3)).version == 3
    chain = json.loads(store.chain_path.read_text())
    chain.append(json.loads(Root().issue(4)))  # planted after the real ones
    store.chain_path.write_text(json.dumps(chain))
    reached = NodeStore(tmp_path / "data").load_trust(path, now=time.time())
    assert reached.version == 3
    assert reached.trust.roles[Role.ROOT].keyids == (new_root.key.keyid,)


def test_an_expired_list_on_the_way_is_passed(tmp_path: Path, shipped: tuple[Root, Path]) -> None:
    root, path = shipped
    store = NodeStore(tmp_path / "data")
    short = root.issue(2, expires_in_s=1)
    _rotate(store, path, short)
    _rotate(store, path, root.issue(3))
    later = time.time() + 10  # v2 has expired by then; v3 has not
    assert NodeStore(tmp_path / "data").load_trust(path, now=later).version == 3


def test_a_deleted_or_cut_chain_never_brings_old_keys_back(
    tmp_path: Path, shipped: tuple[Root, Path]
) -> None:
    root, path = shipped
    store = NodeStore(tmp_path / "data")
    _rotate(store, path, root.issue(2))
    _rotate(store, path, root.issue(3))
    chain = json.loads(store.chain_path.read_text())
    store.chain_path.write_text(json.dumps(chain[:1]))
    with pytest.raises(TrustFileError, match="reaches v2, but this node has taken v3"):
        NodeStore(tmp_path / "data").load_trust(path, now=time.time())
    store.chain_path.unlink()
    with pytest.raises(TrustFileError, match="was removed or altered"):
        NodeStore(tmp_path / "data").load_trust(path, now=time.time())
    # Another list of the same version is no substitute either.
    store.chain_path.write_text(json.dumps([*chain[:1], json.loads(root.issue(3))]))
    with pytest.raises(TrustFileError, match="altered"):
        NodeStore(tmp_path / "data").load_trust(path, now=time.time())


def test_no_shipped_list_is_a_refusal(tmp_path: Path) -> None:
    NodeStore(tmp_path / "data").save(PersistedState())
    with pytest.raises(TrustFileError, match="trust anchor is required"):
        NodeStore(tmp_path / "data").load_trust(None, now=time.time())
