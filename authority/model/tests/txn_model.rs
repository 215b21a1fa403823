//! A model of the promotion protocol (two-phase commit across the global group and a site
//! group), checked by the `stateright` model checker: every run up to a bound, and random long
//! runs.
//!
//! What is real and what is modelled:
//! - The participants are the real state machines: each group actor holds a
//!   [`GroupState`] and applies the real [`Command`]s with [`GroupState::apply`], as every
//!   member of a group does with its Raft log. A group is durable (its log is fsync'd before
//!   an answer), so a group's crash keeps its state (stateright's actor storage) and only
//!   makes it unreachable until it restarts.
//! - The coordinators are the real [`Coordinator`] step machine that `txn::promote` and
//!   `txn::resolve` drive in the daemon. Requests and answers travel as the JSON they are on
//!   the wire.
//! - The network duplicates and reorders every message (stateright's unordered duplicating
//!   network) and, in the random runs, loses them (in the exhaustive run a lost message is one
//!   never delivered, see `exhaustive`). A coordinator re-sends its request on a timer (the client's
//!   retry); an answer is taken only if it answers the request the coordinator is waiting on.
//! - Crashes: any one actor at a time may crash and restart (stateright's crash/recover). A
//!   restarted coordinator starts the promotion again under the same transaction id (the
//!   operator's retry); the recovery actor (the global leader's recovery loop) resolves each
//!   transaction again and again, at any moment, also while its coordinator is alive (its
//!   "stale after" time is not a safety assumption, so the model does not have it).
//!
//! Two promotions of one device to the same site race (`t1` and `t2`), so intents have
//! something to block. The properties are below (`always` and `sometimes`); two tests at the end
//! break the protocol on purpose and show that the checker finds each flaw.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use authority::coordinator::{Coordinator, Reply, Request};
use authority::error::AuthError;
use authority::state::{Command, GroupState};
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelAction, ActorModelState, Id, LossyNetwork, Network,
    Out,
};
use stateright::{Checker, Chooser, Expectation, Model};

const DEVICE: &str = "dev0";
const SITE: &str = "b";
const VOLUME: &str = "vb";
const GLOBAL_ID: usize = 0;
const SITE_ID: usize = 1;

/// A deliberate defect, to show the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// The site commits as soon as it votes yes, without waiting for the recorded decision.
    SiteCommitsOnItsVote,
    /// The site forgets that it was told to abort a transaction it never prepared, so a
    /// late prepare (a duplicate or a retry) can still lock the volume.
    SiteForgetsUnpreparedAborts,
}

#[derive(Debug, Clone)]
struct Cfg {
    txns: Vec<&'static str>,
}

/// One group's replicated state plus what the checker records about it (ghost state, never
/// read by the protocol).
#[derive(Debug, Clone, PartialEq)]
struct Replica {
    state: GroupState,
    /// txn id -> every effect this group applied for it, in order (true = commit).
    applied: BTreeMap<String, Vec<bool>>,
    /// txn id -> the first decision this (global) group recorded.
    first_decision: BTreeMap<String, bool>,
    /// A change was refused because another transaction's intent held the record.
    refused_by_intent: bool,
}

impl Hash for Replica {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let s = &self.state;
        s.devices.hash(h);
        s.txns.hash(h);
        s.volumes.hash(h);
        s.prepared.hash(h);
        // Servers hold JSON health, which has no Hash; the model never changes a server.
        s.servers.keys().for_each(|k| k.hash(h));
        self.applied.hash(h);
        self.first_decision.hash(h);
        self.refused_by_intent.hash(h);
    }
}

impl Replica {
    fn global() -> Replica {
        let mut state = GroupState::default();
        state
            .apply(&Command::DeviceCreate {
                device: DEVICE.into(),
                size_bytes: 1 << 20,
                block_size: 512,
                volumes: [
                    ("a".to_string(), "va".to_string()),
                    (SITE.into(), VOLUME.into()),
                ]
                .into(),
                authoritative_site: "a".into(),
            })
            .unwrap();
        Replica::new(state)
    }

    fn site() -> Replica {
        let mut state = GroupState::default();
        state
            .apply(&Command::ServerRegister {
                server_id: "s1".into(),
                data_addr: "d".into(),
                admin_addr: "a".into(),
            })
            .unwrap();
        state
            .apply(&Command::VolumeCreate {
                volume: VOLUME.into(),
                device: DEVICE.into(),
                size_bytes: 1 << 20,
                block_size: 512,
                servers: vec!["s1".into()],
                generation: 1,
            })
            .unwrap();
        Replica::new(state)
    }

    fn new(state: GroupState) -> Replica {
        Replica {
            state,
            applied: BTreeMap::new(),
            first_decision: BTreeMap::new(),
            refused_by_intent: false,
        }
    }

    /// The intent and generation of the record this group owns (the device or the volume).
    fn record(&self) -> (Option<String>, u64) {
        let (intent, generation) = match self.state.devices.get(DEVICE) {
            Some(d) => (&d.intent, d.generation),
            None => {
                let v = &self.state.volumes[VOLUME];
                (&v.intent, v.generation)
            }
        };
        (intent.as_ref().map(|i| i.txn_id.clone()), generation)
    }

    /// Apply a command with the real state machine, noting its effects for the checker.
    fn apply(&mut self, cmd: &Command) -> Result<authority::state::Outcome, AuthError> {
        let (intent_before, generation_before) = self.record();
        let out = self.state.apply(cmd);
        let (intent_after, generation_after) = self.record();
        if let Some(t) = intent_before {
            if intent_after.as_deref() != Some(t.as_str()) {
                self.applied
                    .entry(t)
                    .or_default()
                    .push(generation_after != generation_before);
            }
        }
        for (t, rec) in &self.state.txns {
            if let Some(d) = rec.decision {
                self.first_decision.entry(t.clone()).or_insert(d);
            }
        }
        if matches!(out, Err(AuthError::TxnConflict { .. })) {
            self.refused_by_intent = true;
        }
        out
    }

    /// What this group holds about `t`'s outcome: effects applied, and (site) the outcome it
    /// recorded for a transaction it never prepared.
    fn outcomes(&self, t: &str) -> Vec<bool> {
        let mut v = self.applied.get(t).cloned().unwrap_or_default();
        if let Some(Some(o)) = self.state.prepared.get(t) {
            v.push(*o);
        }
        v
    }
}

/// A message's JSON text, interned: states are cloned and hashed at every step, so they
/// carry a number; the text is what the real client and server exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Wire(u32);

struct Interner {
    ids: HashMap<String, u32>,
    texts: Vec<String>,
}

static WIRE: Mutex<Option<Interner>> = Mutex::new(None);

impl Wire {
    fn of(text: String) -> Wire {
        let mut g = WIRE.lock().unwrap();
        let i = g.get_or_insert_with(|| Interner {
            ids: HashMap::new(),
            texts: Vec::new(),
        });
        if let Some(id) = i.ids.get(&text) {
            return Wire(*id);
        }
        let id = i.texts.len() as u32;
        i.texts.push(text.clone());
        i.ids.insert(text, id);
        Wire(id)
    }

    fn text(self) -> String {
        WIRE.lock().unwrap().as_ref().expect("interned").texts[self.0 as usize].clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    /// A [`Request`].
    Req(Wire),
    /// The answer (a [`Reply`]) to the request `req`.
    Rep { req: Wire, rep: Wire },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
enum Timer {
    Retry,
}

#[derive(Debug, Clone)]
enum Node {
    Global,
    Site {
        flaw: Flaw,
    },
    /// Promotes DEVICE to SITE under this transaction id.
    Coordinator {
        txn_id: &'static str,
    },
    /// The recovery loop: resolves these transactions in turn.
    Recovery {
        txns: Vec<&'static str>,
    },
}

#[derive(Debug, Clone, PartialEq, Hash)]
enum NodeState {
    Group(Replica),
    Coordinator(Coordinator),
    Recovery {
        current: Option<Coordinator>,
        next: usize,
    },
}

fn encode_request(r: &Request) -> Wire {
    Wire::of(serde_json::to_string(r).expect("request serializes"))
}

fn send(c: &Coordinator, o: &mut Out<Node>) {
    if let Some(req) = c.request() {
        let dst = match req {
            Request::Site { .. } => SITE_ID,
            Request::Global(_) | Request::Record { .. } => GLOBAL_ID,
        };
        o.send(Id::from(dst), Msg::Req(encode_request(&req)));
    }
}

/// Feed an answer to a coordinator if it answers what it waits for. `Some(ok)` when taken.
fn take_reply(c: &mut Coordinator, req: Wire, rep: Wire) -> Option<bool> {
    let waiting = c.request()?;
    if encode_request(&waiting) != req {
        return None;
    }
    let reply: Reply = serde_json::from_str(&rep.text()).expect("reply parses");
    Some(c.on_reply(reply).is_ok())
}

impl Actor for Node {
    type Msg = Msg;
    type Timer = Timer;
    type State = NodeState;
    type Storage = Replica;
    type Random = ();

    fn on_start(&self, _id: Id, storage: &Option<Replica>, o: &mut Out<Self>) -> NodeState {
        match self {
            Node::Global => NodeState::Group(storage.clone().unwrap_or_else(Replica::global)),
            Node::Site { .. } => NodeState::Group(storage.clone().unwrap_or_else(Replica::site)),
            Node::Coordinator { txn_id } => {
                // A first start, or a restart after a crash: the operator (re)tries the
                // promotion under the same id.
                let c = Coordinator::promote(txn_id, DEVICE, SITE);
                send(&c, o);
                o.set_timer(Timer::Retry, model_timeout());
                NodeState::Coordinator(c)
            }
            Node::Recovery { .. } => {
                o.set_timer(Timer::Retry, model_timeout());
                NodeState::Recovery {
                    current: None,
                    next: 0,
                }
            }
        }
    }

    fn on_msg(&self, _id: Id, state: &mut Cow<NodeState>, src: Id, msg: Msg, o: &mut Out<Self>) {
        match (self, msg) {
            (Node::Global | Node::Site { .. }, Msg::Req(req_json)) => {
                let NodeState::Group(r) = state.as_ref() else {
                    unreachable!("a group's state")
                };
                let mut r = r.clone();
                let req: Request = serde_json::from_str(&req_json.text()).expect("request parses");
                let reply = match req {
                    Request::Record { txn_id } => {
                        Reply::Record(Ok(r.state.txns.get(&txn_id).cloned()))
                    }
                    Request::Global(cmd) | Request::Site { cmd, .. } => {
                        let unprepared_abort = match &cmd {
                            Command::TxnFinish {
                                txn_id,
                                commit: false,
                            } => !r.state.prepared.contains_key(txn_id),
                            _ => false,
                        };
                        let out = r.apply(&cmd);
                        if let (Node::Site { flaw }, Command::TxnFinish { txn_id, .. }) =
                            (self, &cmd)
                        {
                            if *flaw == Flaw::SiteForgetsUnpreparedAborts && unprepared_abort {
                                r.state.prepared.remove(txn_id);
                            }
                        }
                        if let (Node::Site { flaw }, Command::TxnPrepare { txn_id, .. }, Ok(_)) =
                            (self, &cmd, &out)
                        {
                            if *flaw == Flaw::SiteCommitsOnItsVote
                                && r.state.prepared.get(txn_id) == Some(&None)
                            {
                                let _ = r.apply(&Command::TxnFinish {
                                    txn_id: txn_id.clone(),
                                    commit: true,
                                });
                            }
                        }
                        Reply::Outcome(out)
                    }
                };
                // Durable before it answers (the group's log is fsync'd).
                o.save(r.clone());
                let rep = Wire::of(serde_json::to_string(&reply).expect("reply serializes"));
                o.send(src, Msg::Rep { req: req_json, rep });
                *state = Cow::Owned(NodeState::Group(r));
            }
            (Node::Coordinator { txn_id }, Msg::Rep { req, rep }) => {
                let NodeState::Coordinator(c) = state.as_ref() else {
                    unreachable!("a coordinator's state")
                };
                let mut c = c.clone();
                match take_reply(&mut c, req, rep) {
                    None => return,
                    // It stopped midway (e.g. refused by another transaction's intent): the
                    // operator retries under the same id.
                    Some(false) => c = Coordinator::promote(txn_id, DEVICE, SITE),
                    Some(true) => {}
                }
                send(&c, o);
                *state = Cow::Owned(NodeState::Coordinator(c));
            }
            (Node::Recovery { .. }, Msg::Rep { req, rep }) => {
                let NodeState::Recovery { current, next } = state.as_ref() else {
                    unreachable!("the recovery loop's state")
                };
                let Some(mut c) = current.clone() else {
                    return;
                };
                let next = *next;
                match take_reply(&mut c, req, rep) {
                    None => {}
                    Some(true) if c.request().is_some() => {
                        send(&c, o);
                        *state = Cow::Owned(NodeState::Recovery {
                            current: Some(c),
                            next,
                        });
                    }
                    // Finished, or stopped (e.g. not begun yet): try again on a later pass.
                    Some(_) => {
                        *state = Cow::Owned(NodeState::Recovery {
                            current: None,
                            next,
                        })
                    }
                }
            }
            _ => {}
        }
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<NodeState>, _t: &Timer, o: &mut Out<Self>) {
        match (self, state.as_ref()) {
            // The client's retry of a request that may have been lost.
            (Node::Coordinator { .. }, NodeState::Coordinator(c)) if c.request().is_some() => {
                send(c, o);
                o.set_timer(Timer::Retry, model_timeout());
            }
            (Node::Recovery { txns }, NodeState::Recovery { current, next }) => {
                match current {
                    // The client's retry of a request that may have been lost.
                    Some(c) => send(c, o),
                    // A pass of the recovery loop.
                    None => {
                        let c = Coordinator::resolve(txns[*next]);
                        send(&c, o);
                        *state = Cow::Owned(NodeState::Recovery {
                            current: Some(c),
                            next: (*next + 1) % txns.len(),
                        });
                    }
                }
                o.set_timer(Timer::Retry, model_timeout());
            }
            _ => {}
        }
    }
}

type State = ActorModelState<Node>;
type Action = ActorModelAction<Msg, Timer, ()>;

fn group(s: &State, id: usize) -> &Replica {
    match &*s.actor_states[id] {
        NodeState::Group(r) => r,
        other => unreachable!("actor {id} is a group, not {other:?}"),
    }
}

fn coordinators(s: &State) -> impl Iterator<Item = &Coordinator> {
    s.actor_states.iter().filter_map(|a| match &**a {
        NodeState::Coordinator(c) => Some(c),
        _ => None,
    })
}

fn atomic(m: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    m.cfg.txns.iter().all(|t| {
        let mut all = g.outcomes(t);
        all.extend(site.outcomes(t));
        !(all.contains(&true) && all.contains(&false))
    })
}

fn applied_only_as_decided(m: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    m.cfg.txns.iter().all(|t| {
        let decision = g.state.txns.get(*t).and_then(|r| r.decision);
        g.outcomes(t)
            .into_iter()
            .chain(site.outcomes(t))
            .all(|o| decision == Some(o))
    })
}

fn decision_never_changes(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let g = group(s, GLOBAL_ID);
    g.first_decision
        .iter()
        .all(|(t, d)| g.state.txns.get(t).and_then(|r| r.decision) == Some(*d))
}

fn applies_at_most_once(m: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    let commits = |r: &Replica| r.applied.values().flatten().filter(|c| **c).count() as u64;
    let once = m.cfg.txns.iter().all(|t| {
        g.applied.get(*t).map_or(0, Vec::len) <= 1 && site.applied.get(*t).map_or(0, Vec::len) <= 1
    });
    // Each commit moved the generation (and the volume's epoch) by exactly one.
    let v = &site.state.volumes[VOLUME];
    once && g.state.devices[DEVICE].generation == 1 + commits(g)
        && v.generation == 1 + commits(site)
        && v.epoch == 1 + commits(site)
}

fn intents_serialize_transactions(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    // A site's intent belongs to the transaction that holds the device: never to one the
    // global group has finished (or never began), never beside another transaction's.
    match group(s, SITE_ID).record().0 {
        Some(t) => group(s, GLOBAL_ID).record().0 == Some(t),
        None => true,
    }
}

fn finished_coordinators_tell_the_truth(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    coordinators(s).all(|c| match c.result() {
        None => true,
        Some(p) => {
            let t = c.txn_id();
            g.outcomes(t) == vec![p.committed] && site.outcomes(t).last() == Some(&p.committed)
        }
    })
}

fn committed_in_both(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    g.outcomes("t1") == [true] && site.outcomes("t1").contains(&true)
}

fn aborted_in_both(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    let (g, site) = (group(s, GLOBAL_ID), group(s, SITE_ID));
    g.outcomes("t1") == [false] && site.outcomes("t1").contains(&false)
}

fn both_committed_one_after_the_other(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    group(s, GLOBAL_ID).state.devices[DEVICE].generation == 3
}

fn a_change_was_refused_by_an_intent(_: &ActorModel<Node, Cfg>, s: &State) -> bool {
    group(s, GLOBAL_ID).refused_by_intent || group(s, SITE_ID).refused_by_intent
}

fn model(flaw: Flaw, txns: Vec<&'static str>, lossy: LossyNetwork) -> ActorModel<Node, Cfg> {
    let mut nodes = vec![Node::Global, Node::Site { flaw }];
    nodes.extend(txns.iter().map(|t| Node::Coordinator { txn_id: t }));
    nodes.push(Node::Recovery { txns: txns.clone() });
    ActorModel::new(Cfg { txns }, ())
        .actors(nodes)
        .init_network(Network::new_unordered_duplicating([]))
        .lossy_network(lossy)
        .max_crashes(1)
        .property(Expectation::Always, "atomic", atomic)
        .property(
            Expectation::Always,
            "applied only as decided",
            applied_only_as_decided,
        )
        .property(
            Expectation::Always,
            "the decision never changes",
            decision_never_changes,
        )
        .property(
            Expectation::Always,
            "a transaction applies at most once",
            applies_at_most_once,
        )
        .property(
            Expectation::Always,
            "intents serialize transactions",
            intents_serialize_transactions,
        )
        .property(
            Expectation::Always,
            "a finished coordinator's answer holds in both groups",
            finished_coordinators_tell_the_truth,
        )
        .property(
            Expectation::Sometimes,
            "t1 committed in both groups",
            committed_in_both,
        )
        .property(
            Expectation::Sometimes,
            "t1 aborted in both groups",
            aborted_in_both,
        )
        .property(
            Expectation::Sometimes,
            "t1 and t2 both committed",
            both_committed_one_after_the_other,
        )
        .property(
            Expectation::Sometimes,
            "a change refused by an intent",
            a_change_was_refused_by_an_intent,
        )
}

/// Every interleaving of up to `depth` events (breadth-first), one promotion.
fn exhaustive(flaw: Flaw, depth: usize) -> impl Checker<ActorModel<Node, Cfg>> {
    let t = Instant::now();
    // No explicit loss here: in an unordered network that never has to deliver anything, a
    // lost message is one that is never delivered, so for safety the drop action adds states
    // but no behaviour. The random runs below drop messages explicitly.
    let checker = model(flaw, vec!["t1"], LossyNetwork::No)
        .checker()
        .threads(2)
        .target_max_depth(depth)
        .spawn_bfs()
        .join();
    eprintln!(
        "{flaw:?}, every run of up to {depth} events: {} states ({} unique) in {:?}",
        checker.state_count(),
        checker.unique_state_count(),
        t.elapsed()
    );
    checker
}

const ALWAYS: [&str; 6] = [
    "atomic",
    "applied only as decided",
    "the decision never changes",
    "a transaction applies at most once",
    "intents serialize transactions",
    "a finished coordinator's answer holds in both groups",
];

fn assert_no_violation(c: &impl Checker<ActorModel<Node, Cfg>>) {
    for p in ALWAYS {
        if let Some(path) = c.discovery(p) {
            panic!("{p} violated:\n{path:#?}");
        }
    }
}

#[test]
fn every_short_run_of_a_promotion_is_safe_under_reordering_duplication_and_crashes() {
    let c = exhaustive(
        Flaw::None,
        std::env::var("DEPTH").map_or(17, |d| d.parse().unwrap()),
    );
    assert_no_violation(&c);
    for p in ["t1 committed in both groups", "t1 aborted in both groups"] {
        assert!(
            c.discovery(p).is_some(),
            "{p}: not reached, the check is vacuous"
        );
    }
}

/// Picks the next event of a random run: deliveries mostly, now and then a loss, a timeout
/// or a crash, and never an event that leads back to a state of this run (stateright ends a
/// run there; in a duplicating network most re-deliveries change nothing).
#[derive(Clone)]
struct ProgressChooser(Arc<ActorModel<Node, Cfg>>);

struct Run {
    rng: u64,
    seen: HashSet<u64>,
}

fn state_hash(s: &State) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Chooser<ActorModel<Node, Cfg>> for ProgressChooser {
    type State = Run;

    fn new_state(&self, seed: u64) -> Run {
        Run {
            rng: seed | 1,
            seen: HashSet::new(),
        }
    }

    fn choose_initial_state(&self, _: &mut Run, _: &[State]) -> usize {
        0
    }

    fn choose_action(&self, run: &mut Run, current: &State, actions: &[Action]) -> usize {
        run.seen.insert(state_hash(current));
        let weight = |a: &Action| match a {
            ActorModelAction::Deliver { .. } => 40,
            ActorModelAction::Recover(_) => 20,
            ActorModelAction::Timeout(..) => 4,
            ActorModelAction::Drop(_) => 2,
            ActorModelAction::Crash(_) => 1,
            ActorModelAction::SelectRandom { .. } => 1,
        };
        let mut left: Vec<usize> = (0..actions.len()).collect();
        while !left.is_empty() {
            let total: u64 = left.iter().map(|i| weight(&actions[*i])).sum();
            // xorshift64: reproducible from the seed, no dependency.
            run.rng ^= run.rng << 13;
            run.rng ^= run.rng >> 7;
            run.rng ^= run.rng << 17;
            let mut x = run.rng % total;
            let pos = left
                .iter()
                .position(|i| {
                    let w = weight(&actions[*i]);
                    if x < w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .expect("x < total");
            let i = left[pos];
            if let Some(next) = self.0.next_state(current, actions[i].clone()) {
                if !run.seen.contains(&state_hash(&next)) {
                    return i;
                }
            }
            left.swap_remove(pos);
        }
        0
    }
}

#[test]
fn random_long_runs_of_two_promotions_are_safe_under_loss_duplication_reordering_and_crashes() {
    let t = Instant::now();
    let m = model(Flaw::None, vec!["t1", "t2"], LossyNetwork::Yes);
    let chooser = ProgressChooser(Arc::new(m.clone()));
    let c = m
        .checker()
        // One thread: the runs, and so the test, are the same every time.
        .threads(1)
        .target_max_depth(150)
        .target_state_count(std::env::var("STATES").map_or(150_000, |d| d.parse().unwrap()))
        .spawn_simulation(7, chooser)
        .join();
    eprintln!(
        "random runs of up to 150 events, two promotions: {} states in {:?}",
        c.state_count(),
        t.elapsed()
    );
    assert_no_violation(&c);
    for p in [
        "t1 committed in both groups",
        "t1 aborted in both groups",
        "t1 and t2 both committed",
        "a change refused by an intent",
    ] {
        assert!(
            c.discovery(p).is_some(),
            "{p}: not reached, the check is vacuous"
        );
    }
}

#[test]
fn the_checker_finds_a_site_that_commits_without_the_decision() {
    let c = exhaustive(Flaw::SiteCommitsOnItsVote, 12);
    let path = c
        .discovery("applied only as decided")
        .expect("the flaw went unnoticed");
    eprintln!("counterexample of {} events", path.into_actions().len());
}

#[test]
fn the_checker_finds_a_site_that_forgets_an_abort_it_never_prepared() {
    let c = exhaustive(Flaw::SiteForgetsUnpreparedAborts, 16);
    let path = c
        .discovery("intents serialize transactions")
        .expect("the flaw went unnoticed");
    eprintln!("counterexample of {} events", path.into_actions().len());
}
