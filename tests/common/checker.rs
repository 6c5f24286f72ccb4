//! The one checker of the delivery guarantee on channels with history, shared by
//! every test that checks delivery: within an epoch a subscription's offsets are
//! strictly consecutive; every hole is covered by a `gap` or a `recovered:false`
//! the client saw; every acked publish is delivered to every subscription that was
//! live then, or covered by such a report.
//!
//! A subscription is what one client saw of one channel, across reconnects, in the
//! order it saw it: positions (a `welcome`'s, a `sub` ack's, with `recovered` when
//! it recovered), `msg` and `gap` frames. Messages carry their publisher's unique id
//! in `data` (`{"n": id}`), so a lost acked publish is found by id even where a
//! failover gave its offset to another message.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Value, json};

/// What one client saw of one channel.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// For reports: which client, which channel.
    pub name: String,
    pub events: Vec<Value>,
}

impl Subscription {
    pub fn new(name: impl Into<String>) -> Subscription {
        Subscription {
            name: name.into(),
            events: Vec::new(),
        }
    }

    /// A position the client was given (`welcome`, or a `sub` ack; `recovered` is
    /// `None` for a plain subscribe).
    pub fn position(&mut self, epoch: &str, offset: u64, recovered: Option<bool>) {
        self.events.push(
            json!({"op": "position", "epoch": epoch, "offset": offset, "recovered": recovered}),
        );
    }

    /// A `msg` or `gap` frame of this channel.
    pub fn frame(&mut self, frame: Value) {
        self.events.push(frame);
    }

    /// Where delivery stands: (epoch, last offset), if a position was given.
    pub fn cursor(&self) -> Option<(String, u64)> {
        let mut cursor: Option<(String, u64)> = None;
        for event in &self.events {
            let offset = event["offset"].as_u64().unwrap_or(0);
            match event["op"].as_str() {
                Some("position") | Some("gap") => {
                    cursor = Some((event["epoch"].as_str().unwrap_or("").to_owned(), offset));
                }
                Some("msg") => {
                    if let Some(cursor) = cursor.as_mut() {
                        cursor.1 = offset;
                    }
                }
                _ => {}
            }
        }
        cursor
    }
}

/// An acked publish: the publisher's id (`data.n`), its channel and offset.
#[derive(Debug, Clone)]
pub struct Acked {
    pub channel: String,
    pub n: u64,
    pub offset: u64,
}

/// What a run delivered, and what went wrong.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub subscriptions: usize,
    /// `msg` frames delivered.
    pub messages: usize,
    /// Offsets delivered at or below one already delivered in the same epoch, with
    /// no `gap` in between, and messages delivered twice.
    pub duplicates: usize,
    /// Offsets skipped with no `gap` or `recovered:false` to say so.
    pub silent_holes: usize,
    /// Acked publishes a live subscription neither received nor was told it lost.
    pub lost_acked: usize,
    /// `gap` frames and `recovered:false` acks (allowed where the fault loses data).
    pub gaps: usize,
    /// Gaps into a new epoch past its offset 0: what the new history held was
    /// reported lost instead of delivered (needless where nothing trims it).
    pub new_epoch_gaps_past_zero: usize,
    /// The first problems, for the failure message.
    pub problems: Vec<String>,
}

impl Report {
    /// No duplicate, no silent hole, no acked publish silently lost.
    pub fn exactly_once(&self) -> bool {
        self.duplicates == 0 && self.silent_holes == 0 && self.lost_acked == 0
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 20 {
            self.problems.push(what);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} subscriptions, {} messages, {} duplicates, {} silent holes, {} acked lost, {} gaps",
            self.subscriptions,
            self.messages,
            self.duplicates,
            self.silent_holes,
            self.lost_acked,
            self.gaps
        )?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Checks every subscription of `channel`-named subscriptions against the acked
/// publishes of its channel. `channel_of` names the channel of a subscription.
pub fn check<'a>(
    subscriptions: impl IntoIterator<Item = (&'a str, &'a Subscription)>,
    acked: &[Acked],
) -> Report {
    let mut report = Report::default();
    for (channel, sub) in subscriptions {
        report.subscriptions += 1;
        check_one(channel, sub, acked, &mut report);
    }
    report
}

fn check_one(channel: &str, sub: &Subscription, acked: &[Acked], report: &mut Report) {
    // (epoch, last offset delivered or reported).
    let mut cursor: Option<(String, u64)> = None;
    // Where the subscription started: acked publishes at or below it are not its.
    let mut start: Option<(String, u64)> = None;
    let mut delivered: HashSet<u64> = HashSet::new();
    // What was reported lost, as (epoch, offset): a `gap` or `recovered:false` at
    // offset g says nothing up to g in that epoch may still come; `u64::MAX` ends a
    // whole epoch (a new one began).
    let mut reported: Vec<(String, u64)> = Vec::new();
    let name = &sub.name;
    for event in &sub.events {
        let offset = event["offset"].as_u64().unwrap_or(0);
        let epoch = event["epoch"].as_str().unwrap_or("").to_owned();
        match event["op"].as_str() {
            Some("position") => {
                let recovered = event["recovered"].as_bool();
                match (&cursor, recovered) {
                    (None, _) => start = Some((epoch.clone(), offset)),
                    (Some((e, last)), Some(true)) => {
                        // The recovered messages came before: the ack is where they end.
                        if *e != epoch || *last != offset {
                            report.silent_holes += 1;
                            report.problem(format!(
                                "{name}: recovered:true at {epoch}:{offset} after {e}:{last}"
                            ));
                        }
                    }
                    (Some((e, _)), _) => {
                        // Not recovered: everything up to here is reported lost.
                        report.gaps += 1;
                        if *e != epoch {
                            reported.push((e.clone(), u64::MAX));
                        }
                        reported.push((epoch.clone(), offset));
                    }
                }
                cursor = Some((epoch, offset));
            }
            Some("gap") => {
                report.gaps += 1;
                match &cursor {
                    Some((e, _)) if *e != epoch => {
                        reported.push((e.clone(), u64::MAX));
                        if offset > 0 {
                            report.new_epoch_gaps_past_zero += 1;
                            report.problem(format!(
                                "{name}: new epoch {epoch} begun at gap {offset}"
                            ));
                        }
                    }
                    // The history went back (a failover lost writes): the offsets
                    // after it are given to new messages, and what the old master
                    // acked above it, delivered or not, is gone — all reported.
                    Some((_, last)) if offset < *last => reported.push((epoch.clone(), u64::MAX)),
                    _ => {}
                }
                reported.push((epoch.clone(), offset));
                cursor = Some((epoch, offset));
            }
            Some("msg") => {
                report.messages += 1;
                if let Some(n) = event["data"]["n"].as_u64()
                    && !delivered.insert(n)
                {
                    // The same message twice, whatever offsets say (a gap that
                    // claims the history went back, then the same messages again).
                    report.duplicates += 1;
                    report.problem(format!("{name}: message {n} twice (offset {offset})"));
                    continue;
                }
                let Some((e, last)) = cursor.as_mut() else {
                    report.silent_holes += 1;
                    report.problem(format!("{name}: msg {offset} before any position"));
                    continue;
                };
                if offset <= *last {
                    report.duplicates += 1;
                    report.problem(format!("{name}: offset {offset} after {last} in {e}"));
                } else if offset > *last + 1 {
                    report.silent_holes += (offset - *last - 1) as usize;
                    report.problem(format!(
                        "{name}: {} ..= {} skipped in {e}",
                        *last + 1,
                        offset - 1
                    ));
                }
                *last = offset;
            }
            _ => {}
        }
    }
    let Some((start_epoch, start_offset)) = start else {
        return;
    };
    for ack in acked.iter().filter(|a| a.channel == channel) {
        if delivered.contains(&ack.n) {
            continue;
        }
        // Published before this subscription started (same epoch, at or below its
        // first position): not its.
        let before = ack.offset <= start_offset && !reported.iter().any(|(e, _)| *e != start_epoch);
        if before {
            continue;
        }
        // An acked offset does not say its epoch: any report at or past it covers
        // it.
        let covered = reported.iter().any(|(_, g)| *g >= ack.offset);
        if !covered {
            report.lost_acked += 1;
            report.problem(format!(
                "{name}: acked publish {} (offset {}) neither delivered nor reported",
                ack.n, ack.offset
            ));
        }
    }
}
