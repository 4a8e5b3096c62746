//! Tier resolution: from the ordered rules that apply to one endpoint direction to the
//! entries the classifier looks up, each carrying the action that wins there.
//!
//! The classifier takes the first hit in a fixed order: the peer's own identity before the
//! wildcard, and within each, exact port, port block, whole protocol, any protocol. With keys
//! closed under intersection, that first hit is the smallest key containing the packet, and
//! every rule either contains that whole key or none of the packets it is the first hit
//! for. So deciding each key once, by evaluating the tiers on the key, gives the verdict
//! for every packet: the kernel stays a lookup and the policy logic stays here.

use std::collections::{BTreeMap, BTreeSet};

use policy_common::Direction;
use policy_common::identity;
use policy_common::policy::{COOKIE_DEFAULT_ALLOW, COOKIE_ISOLATED, COOKIE_NODE, PortPrefix};

use super::RuleKey;
use super::cluster_policy::{RuleAction, Tier};

/// Where a rule sits in the evaluation order: node traffic, the Admin tier,
/// NetworkPolicy, the Baseline tier (then the default allow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Node,
    Admin,
    NetworkPolicy,
    Baseline,
}

impl From<Tier> for Stage {
    fn from(tier: Tier) -> Self {
        match tier {
            Tier::Admin => Stage::Admin,
            Tier::Baseline => Stage::Baseline,
        }
    }
}

/// One key of one rule, in evaluation order within its stage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Atom {
    pub stage: Stage,
    pub action: RuleAction,
    pub cookie: u32,
    pub key: RuleKey,
}

/// What one key decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Allow(u32),
    Deny(u32),
    /// A NetworkPolicy isolates and none of its rules allows.
    Isolated,
}

/// The (allow, deny) entries of one direction. `isolated`: a NetworkPolicy isolates it (then
/// what no rule decides is dropped; otherwise a wildcard entry allows it).
pub(crate) fn resolve(direction: Direction, atoms: &[Atom], isolated: bool) -> (BTreeMap<RuleKey, u32>, BTreeMap<RuleKey, u32>) {
    let mut keys: BTreeSet<RuleKey> = atoms.iter().map(|a| a.key).collect();
    if !isolated {
        keys.insert(RuleKey { direction, peer: identity::ANY, protocol: None, port: None });
    }
    let keys = refine(keys);
    let decisions: BTreeMap<RuleKey, Decision> = keys.iter().map(|k| (*k, decide(k, atoms, isolated))).collect();
    let mut allows = BTreeMap::new();
    let mut denies = BTreeMap::new();
    for (key, decision) in &decisions {
        match decision {
            Decision::Allow(cookie) => {
                allows.insert(*key, *cookie);
            }
            Decision::Deny(cookie) => {
                denies.insert(*key, *cookie);
            }
            // Only needed where a less specific entry would otherwise be the hit.
            Decision::Isolated if ancestors(key).any(|a| decisions.get(&a).is_some_and(|d| *d != Decision::Isolated)) => {
                denies.insert(*key, COOKIE_ISOLATED);
            }
            Decision::Isolated => {}
        }
    }
    (allows, denies)
}

/// Adds, for every peer identity with keys of its own, the wildcard-peer keys' port specs:
/// the intersections that make the smallest containing key decide alone. (Port specs are
/// already closed: two specs are nested or disjoint.)
fn refine(keys: BTreeSet<RuleKey>) -> BTreeSet<RuleKey> {
    let any_specs: Vec<RuleKey> = keys.iter().filter(|k| k.peer == identity::ANY).copied().collect();
    let peers: BTreeSet<u32> = keys.iter().map(|k| k.peer).filter(|p| *p != identity::ANY).collect();
    let mut refined = keys;
    for peer in peers {
        for spec in &any_specs {
            refined.insert(RuleKey { peer, ..*spec });
        }
    }
    refined
}

/// Whether every packet `inner` matches, `outer` matches too.
pub(crate) fn contains(outer: &RuleKey, inner: &RuleKey) -> bool {
    let peer = outer.peer == identity::ANY || outer.peer == inner.peer;
    let protocol = outer.protocol.is_none() || outer.protocol == inner.protocol;
    let port = match (outer.port, inner.port) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => o.bits <= i.bits && (o.bits == 0 || (o.port ^ i.port) >> (16 - o.bits) == 0),
    };
    outer.direction == inner.direction && peer && protocol && port
}

/// The keys strictly less specific than `key` that the classifier would try after it.
fn ancestors(key: &RuleKey) -> impl Iterator<Item = RuleKey> + '_ {
    let mut specs: Vec<(Option<u8>, Option<PortPrefix>)> = vec![(None, None)];
    if let Some(protocol) = key.protocol {
        specs.push((Some(protocol), None));
        if let Some(port) = key.port {
            for bits in 1..=port.bits {
                let mask = if bits == 16 { u16::MAX } else { !(u16::MAX >> bits) };
                specs.push((Some(protocol), Some(PortPrefix { port: port.port & mask, bits })));
            }
        }
    }
    let peers = if key.peer == identity::ANY { vec![identity::ANY] } else { vec![key.peer, identity::ANY] };
    peers
        .into_iter()
        .flat_map(move |peer| specs.clone().into_iter().map(move |(protocol, port)| RuleKey { direction: key.direction, peer, protocol, port }))
        .filter(move |k| k != key)
}

/// The tiers' verdict for the packets `key` is the first hit for. `atoms` are in
/// evaluation order within each stage, node atoms first.
fn decide(key: &RuleKey, atoms: &[Atom], isolated: bool) -> Decision {
    let mut passed = false;
    let mut network_policy: Option<&Atom> = None;
    let mut baseline: Option<&Atom> = None;
    for atom in atoms.iter().filter(|a| contains(&a.key, key)) {
        match atom.stage {
            Stage::Node => return Decision::Allow(COOKIE_NODE),
            Stage::Admin if passed => {}
            Stage::Admin => match atom.action {
                RuleAction::Accept => return Decision::Allow(atom.cookie),
                RuleAction::Deny => return Decision::Deny(atom.cookie),
                RuleAction::Pass => passed = true,
            },
            // The most specific allow names the verdict, as it does without tiers.
            Stage::NetworkPolicy if network_policy.is_none_or(|best| specificity(&atom.key) > specificity(&best.key)) => {
                network_policy = Some(atom);
            }
            Stage::NetworkPolicy => {}
            Stage::Baseline if baseline.is_none() => baseline = Some(atom),
            Stage::Baseline => {}
        }
    }
    if isolated {
        return network_policy.map_or(Decision::Isolated, |allow| Decision::Allow(allow.cookie));
    }
    match baseline {
        Some(rule) if rule.action == RuleAction::Deny => Decision::Deny(rule.cookie),
        // Accept, and Pass (which leads to the default allow), name the rule that decided.
        Some(rule) => Decision::Allow(rule.cookie),
        None => Decision::Allow(COOKIE_DEFAULT_ALLOW),
    }
}

fn specificity(key: &RuleKey) -> (bool, bool, u8) {
    (key.peer != identity::ANY, key.protocol.is_some(), key.port.map_or(0, |p| p.bits))
}
