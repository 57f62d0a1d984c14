//! The history's log seam is real: `History` (the group commit) and the
//! reads behind polling and SSE (`history::query::run`) work over any
//! `history::Log`, here a plain in-memory one written in this test, without
//! the segmented log. This is the shape a clustered backend (NATS
//! JetStream) takes: it implements `Log` and nothing else changes.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use hookstream::history::query::{self, Query, Range};
use hookstream::history::{channel_matches, Appending, History, Log, LogCounters, Retained};
use hookstream::message::{Message, MessageKind};
use hookstream::shutdown::Shutdown;

/// Every message of every org, in memory: seq → (kind, route, data).
#[derive(Default)]
struct MemoryLog {
    orgs: RefCell<BTreeMap<String, Vec<Retained>>>,
    rounds: Cell<u64>,
}

impl MemoryLog {
    fn matching(&self, org_id: &str, channels: &[String]) -> Vec<Retained> {
        self.orgs
            .borrow()
            .get(org_id)
            .map(|messages| {
                messages
                    .iter()
                    .filter(|m| {
                        channels
                            .iter()
                            .any(|c| channel_matches(c, m.kind, m.route.as_deref()))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Log for MemoryLog {
    async fn append(&self, round: &[Appending]) -> Result<Vec<u64>, String> {
        self.rounds.set(self.rounds.get() + 1);
        let mut orgs = self.orgs.borrow_mut();
        Ok(round
            .iter()
            .map(|appending| {
                let message = &appending.message;
                let log = orgs.entry(message.org_id.clone()).or_default();
                let seq = log.last().map_or(0, |m| m.seq) + 1;
                log.push(Retained {
                    seq,
                    kind: message.kind,
                    route: message.route_id.as_deref().map(Rc::from),
                    data: Arc::from(&*message.data),
                });
                seq
            })
            .collect())
    }

    fn last_seq(&self, org_id: &str) -> u64 {
        self.orgs
            .borrow()
            .get(org_id)
            .and_then(|m| m.last())
            .map_or(0, |m| m.seq)
    }

    fn trimmed_through(&self, _org_id: &str) -> u64 {
        0
    }

    fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>> {
        let all = self.matching(org_id, channels);
        Some(
            all.into_iter()
                .filter(|m| m.seq > after && m.seq <= upto)
                .collect(),
        )
    }

    async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64) {
        let found: Vec<Retained> = self
            .matching(org_id, channels)
            .into_iter()
            .filter(|m| m.seq > after && m.seq <= upto)
            .collect();
        if found.len() > limit {
            let taken: Vec<Retained> = found.into_iter().take(limit).collect();
            let last = taken.last().map_or(after, |m| m.seq);
            (taken, last)
        } else {
            (found, upto.max(after))
        }
    }

    async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool) {
        let mut found: Vec<Retained> = self
            .matching(org_id, channels)
            .into_iter()
            .filter(|m| before.is_none_or(|b| m.seq < b))
            .collect();
        found.reverse();
        let more = found.len() > limit;
        found.truncate(limit);
        (found, more)
    }

    async fn retain(&self, _now_ms: u64) {}

    fn last_seqs(&self) -> Vec<(String, u64)> {
        self.orgs
            .borrow()
            .iter()
            .filter_map(|(org, m)| m.last().map(|last| (org.clone(), last.seq)))
            .collect()
    }

    fn counters(&self) -> LogCounters {
        LogCounters {
            commits: self.rounds.get(),
            ..LogCounters::default()
        }
    }
}

fn message(kind: MessageKind, route: &str, n: u32) -> Message {
    Message {
        org_id: "org_a".to_string(),
        kind,
        route_id: Some(route.to_string()),
        data: format!("{{\"n\":{n}}}").into(),
        idempotency_key: None,
    }
}

#[test]
fn the_group_commit_and_the_poll_reads_run_over_another_log() {
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("an executor");
    executor.run(async {
        let history = Rc::new(History::new(MemoryLog::default(), Shutdown::new()));
        // Two publishers queue before the committer runs: one round.
        let first = glommio::spawn_local({
            let history = history.clone();
            async move {
                history
                    .append(vec![
                        message(MessageKind::Event, "src_1", 1),
                        message(MessageKind::Issue, "x", 2),
                    ])
                    .await
            }
        });
        let second = glommio::spawn_local({
            let history = history.clone();
            async move {
                history
                    .append(vec![message(MessageKind::Event, "src_2", 3)])
                    .await
            }
        });
        glommio::yield_if_needed().await;
        futures_lite::future::yield_now().await;
        let mut round = history.commit_next().await;
        assert_eq!(round.outcome(), Ok(()));
        let committed: Vec<u64> = round.messages().map(|(_, seq)| seq).collect();
        assert_eq!(committed, [1, 2, 3]);
        assert_eq!(history.committed("org_a"), 3);
        round.answer();
        assert_eq!(first.await, Ok(vec![1, 2]));
        assert_eq!(second.await, Ok(vec![3]));
        assert_eq!(history.counters().commits, 1);

        // A poll of one channel from the start, and a backward list.
        let answer = query::run(
            &*history,
            Query {
                org_id: "org_a".to_string(),
                channels: vec!["events".to_string()],
                range: Range::After(Some(0)),
                limit: 10,
                wait_ms: 0,
            },
        )
        .await;
        let seqs: Vec<u64> = answer.messages.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(answer.next_after, 3);
        let answer = query::run(
            &*history,
            Query {
                org_id: "org_a".to_string(),
                channels: vec!["events:src_2".to_string(), "issues".to_string()],
                range: Range::Before(None),
                limit: 10,
                wait_ms: 0,
            },
        )
        .await;
        let seqs: Vec<u64> = answer.messages.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 2]);
    });
}
