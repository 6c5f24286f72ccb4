//! What the publishers send as `data`: the send timestamp first (the latency is
//! read from it), then padding of the size asked for.

use std::fmt::Write;

/// The padding of a payload (`--payload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// `"p":"xxx…"`: the same letter repeated. Compresses to almost nothing: fine
    /// for delivery costs, meaningless for compression.
    X,
    /// Market data as exchanges publish it (a ticker and its latest trades): the
    /// same keys in every message, numbers that change from one to the next. Each
    /// message compresses about 2x on its own (no context). At least ~400 B.
    Ticker,
}

/// The `data` of message `seq`, sent at `t` (ns since the run's epoch), of about
/// `size` bytes.
pub(crate) fn data(kind: Kind, t: u64, seq: u64, size: usize) -> String {
    let mut out = format!(r#"{{"t":{t},"s":{seq}"#);
    match kind {
        Kind::X => {
            let pad = size.saturating_sub(out.len() + 8);
            let _ = write!(out, r#","p":"{}""#, "x".repeat(pad));
        }
        Kind::Ticker => ticker(&mut out, seq, size),
    }
    out.push('}');
    out
}

/// Appends ticker fields and trades until `out` is about `size` bytes long.
fn ticker(out: &mut String, seq: u64, size: usize) {
    let mut rng = Rng(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cents = |rng: &mut Rng, base: u64, spread: u64| {
        let v = base * 100 + rng.next() % (spread * 100);
        format!("{}.{:02}", v / 100, v % 100)
    };
    let _ = write!(
        out,
        r#","type":"ticker","symbol":"BTC-USD","exchange":"coinbase","seq":{},"bid":{},"bid_size":{},"ask":{},"ask_size":{},"last":{},"volume_24h":{},"high_24h":{},"low_24h":{},"open_24h":{},"change_pct":-{},"ts":{},"trades":["#,
        8_238_380_268 + seq,
        cents(&mut rng, 67_900, 200),
        cents(&mut rng, 0, 9),
        cents(&mut rng, 67_900, 200),
        cents(&mut rng, 0, 9),
        cents(&mut rng, 67_900, 200),
        cents(&mut rng, 7_000, 999),
        cents(&mut rng, 68_400, 100),
        cents(&mut rng, 67_500, 100),
        cents(&mut rng, 67_800, 100),
        cents(&mut rng, 0, 5),
        1_767_275_842_989 + seq,
    );
    let mut k = 0;
    loop {
        let side = if rng.next().is_multiple_of(2) {
            "sell"
        } else {
            "buy"
        };
        let maker = ["ken", "amy", "bob", "zoe"][(rng.next() % 4) as usize];
        if k > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"trade_id":{},"price":{},"size":0.{:08},"side":"{side}","ts":{},"maker":"{maker}"}}"#,
            629_537_871 + seq * 8 + k,
            cents(&mut rng, 67_900, 200),
            rng.next() % 100_000_000,
            1_767_275_838_211 + seq * 7 + k,
        );
        k += 1;
        if out.len() + 2 >= size {
            break;
        }
    }
    out.push(']');
}

/// xorshift64: numbers that differ from message to message, the same in every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_of_about_the_size_asked() {
        // A ticker has ~400 B of fields before its trades.
        for (kind, size) in [
            (Kind::X, 100),
            (Kind::X, 1024),
            (Kind::Ticker, 1024),
            (Kind::Ticker, 4096),
        ] {
            {
                let data = data(kind, 12_345, 7, size);
                let value: serde_json::Value = serde_json::from_str(&data).unwrap();
                assert_eq!(value["t"], 12_345);
                assert!(data.starts_with(r#"{"t":12345,"#));
                let len = data.len() as f64;
                assert!(
                    len > size as f64 * 0.8 && len < size as f64 * 1.25,
                    "{kind:?} {size}: {len}"
                );
            }
        }
        assert_ne!(
            data(Kind::Ticker, 1, 1, 1024),
            data(Kind::Ticker, 1, 2, 1024)
        );
    }
}
