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
        (Some(o), Some(i)) => o.contains(&i),
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

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::proto;

    const PEERS: [u32; 3] = [100, 101, 102];

    fn key(peer: u32, protocol: Option<u8>, port: Option<(u16, u8)>) -> RuleKey {
        RuleKey { direction: Direction::Ingress, peer, protocol, port: port.map(|(port, bits)| PortPrefix { port, bits }) }
    }

    fn atom(stage: Stage, action: RuleAction, cookie: u32, key: RuleKey) -> Atom {
        Atom { stage, action, cookie, key }
    }

    /// The classifier's lookup: the peer, then the wildcard; exact, longest block,
    /// protocol, any protocol. `None`: a miss (dropped, the direction is judged).
    fn first_hit(allows: &BTreeMap<RuleKey, u32>, denies: &BTreeMap<RuleKey, u32>, peer: u32, protocol: u8, port: u16) -> Option<(bool, u32)> {
        for peer in [peer, identity::ANY] {
            let blocks = (1..=16u8).rev().map(|bits| Some((port & !(u16::MAX.checked_shr(u32::from(bits)).unwrap_or(0)), bits)));
            for candidate in blocks.map(|p| key(peer, Some(protocol), p)).chain([key(peer, Some(protocol), None), key(peer, None, None)]) {
                if let Some(cookie) = allows.get(&candidate) {
                    return Some((true, *cookie));
                }
                if let Some(cookie) = denies.get(&candidate) {
                    return Some((false, *cookie));
                }
            }
        }
        None
    }

    /// The API's evaluation of one packet, rule by rule.
    fn evaluate(atoms: &[Atom], isolated: bool, peer: u32, protocol: u8, port: u16) -> bool {
        let packet = key(peer, Some(protocol), Some((port, 16)));
        let matching: Vec<&Atom> = atoms.iter().filter(|a| contains(&a.key, &packet)).collect();
        if matching.iter().any(|a| a.stage == Stage::Node) {
            return true;
        }
        if let Some(admin) = matching.iter().find(|a| a.stage == Stage::Admin) {
            match admin.action {
                RuleAction::Accept => return true,
                RuleAction::Deny => return false,
                RuleAction::Pass => {}
            }
        }
        if isolated {
            return matching.iter().any(|a| a.stage == Stage::NetworkPolicy);
        }
        matching.iter().find(|a| a.stage == Stage::Baseline).is_none_or(|a| a.action != RuleAction::Deny)
    }

    #[test]
    fn a_peer_specific_deny_on_one_port_beats_a_wildcard_allow_only_there() {
        let atoms = [
            atom(Stage::Admin, RuleAction::Deny, 20, key(100, Some(proto::TCP), Some((80, 16)))),
            atom(Stage::NetworkPolicy, RuleAction::Accept, 21, key(identity::ANY, None, None)),
        ];
        let (allows, denies) = resolve(Direction::Ingress, &atoms, true);
        assert_eq!(first_hit(&allows, &denies, 100, proto::TCP, 80), Some((false, 20)));
        assert_eq!(first_hit(&allows, &denies, 100, proto::TCP, 81), Some((true, 21)));
        assert_eq!(first_hit(&allows, &denies, 101, proto::TCP, 80), Some((true, 21)));
    }

    #[test]
    fn isolation_keeps_denying_under_a_less_specific_baseline_accept() {
        // Admin passes TCP from 100 on to NetworkPolicy, which isolates and allows only
        // port 443: port 80 must not reach the Admin accept of the wildcard behind it.
        let atoms = [
            atom(Stage::Admin, RuleAction::Pass, 20, key(100, Some(proto::TCP), None)),
            atom(Stage::Admin, RuleAction::Accept, 22, key(identity::ANY, None, None)),
            atom(Stage::NetworkPolicy, RuleAction::Accept, 21, key(100, Some(proto::TCP), Some((443, 16)))),
        ];
        let (allows, denies) = resolve(Direction::Ingress, &atoms, true);
        assert_eq!(first_hit(&allows, &denies, 100, proto::TCP, 443), Some((true, 21)));
        assert_eq!(first_hit(&allows, &denies, 100, proto::TCP, 80), Some((false, COOKIE_ISOLATED)));
        assert_eq!(first_hit(&allows, &denies, 100, proto::UDP, 80), Some((true, 22)));
    }

    #[test]
    fn what_no_rule_decides_is_allowed_by_default_unless_isolated() {
        let atoms = [atom(Stage::Baseline, RuleAction::Deny, 20, key(100, None, None))];
        let (allows, denies) = resolve(Direction::Ingress, &atoms, false);
        assert_eq!(first_hit(&allows, &denies, 101, proto::UDP, 53), Some((true, COOKIE_DEFAULT_ALLOW)));
        assert_eq!(first_hit(&allows, &denies, 100, proto::UDP, 53), Some((false, 20)));
    }

    /// A small deterministic generator (no dependency for one test).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn random_key(rng: &mut Rng) -> RuleKey {
        let peer = if rng.below(3) == 0 { identity::ANY } else { PEERS[rng.below(3) as usize] };
        let protocol = [None, Some(proto::TCP), Some(proto::UDP)][rng.below(3) as usize];
        let port = match protocol {
            Some(_) if rng.below(2) == 0 => {
                let bits = [16, 16, 15, 14, 12][rng.below(5) as usize];
                let port = 78 + rng.below(6) as u16;
                Some((port & !u16::MAX.checked_shr(u32::from(bits)).unwrap_or(0), bits))
            }
            _ => None,
        };
        key(peer, protocol, port)
    }

    fn random_atoms(rng: &mut Rng) -> Vec<Atom> {
        let stages = [Stage::Node, Stage::Admin, Stage::Admin, Stage::NetworkPolicy, Stage::NetworkPolicy, Stage::Baseline];
        let actions = [RuleAction::Accept, RuleAction::Deny, RuleAction::Pass];
        let mut atoms: Vec<Atom> = (0..1 + rng.below(7))
            .map(|i| {
                let stage = stages[rng.below(stages.len() as u64) as usize];
                let action = if matches!(stage, Stage::Admin | Stage::Baseline) { actions[rng.below(3) as usize] } else { RuleAction::Accept };
                atom(stage, action, 16 + i as u32, random_key(rng))
            })
            .collect();
        atoms.sort_by_key(|a| a.stage);
        atoms
    }

    #[test]
    fn the_first_hit_gives_the_api_verdict_for_every_packet() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..1000 {
            let atoms = random_atoms(&mut rng);
            let isolated = rng.below(2) == 0;
            let (allows, denies) = resolve(Direction::Ingress, &atoms, isolated);
            assert!(allows.keys().all(|k| !denies.contains_key(k)), "case {case}");
            for peer in PEERS.into_iter().chain([7]) {
                for protocol in [proto::TCP, proto::UDP, proto::SCTP] {
                    for port in 76..86 {
                        let want = evaluate(&atoms, isolated, peer, protocol, port);
                        let have = first_hit(&allows, &denies, peer, protocol, port).is_some_and(|(allowed, _)| allowed);
                        assert_eq!(have, want, "case {case}: peer {peer} proto {protocol} port {port}, isolated {isolated}\n{atoms:#?}\nallows {allows:?}\ndenies {denies:?}");
                    }
                }
            }
        }
    }
}
