//! Compression settings: permessage-deflate (RFC 7692) on WebSocket connections,
//! their flags, defaults and ranges.
//!
//! A node compresses a frame once and shares the result with every connection that
//! negotiated the extension, so what compression costs is per publication and node,
//! not per subscriber (see `transport::deflate`).

use super::ConfigError;

/// permessage-deflate on WebSocket connections.
#[derive(Debug, Clone, clap::Args)]
pub struct CompressionConfig {
    /// Negotiate permessage-deflate with clients that offer it (browsers, most
    /// libraries do): frames of at least `--compression-min-bytes` are sent
    /// compressed, each built once per node and shared by every connection that
    /// negotiated it, and compressed client messages are accepted. `off`: the offer
    /// is declined and everything travels as before. On by default: 1 KiB JSON
    /// payloads take 2.4x fewer bytes for no measurable CPU per delivery
    /// (BENCHMARKS.md, README "Compression").
    #[arg(
        long,
        env = "WSRELAY_COMPRESSION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "on",
        value_name = "on|off",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub compression: bool,

    /// Smallest frame, in bytes, sent compressed; smaller ones go plain. Deflate
    /// without context saves almost nothing on short JSON (100 B: ~10%, less than
    /// the work costs the client) and from ~250 B on saves 30% or more.
    #[arg(long, env = "WSRELAY_COMPRESSION_MIN_BYTES", default_value_t = 256)]
    pub compression_min_bytes: usize,

    /// Deflate level, 1 (fastest) to 9 (smallest). 2: with zlib-rs, level 1 is a
    /// quick mode without its own Huffman codes (1 KiB of JSON shrinks to ~64%);
    /// 2 reaches ~49%, within 2% of level 6, at 12 µs per KiB.
    #[arg(long, env = "WSRELAY_COMPRESSION_LEVEL", default_value_t = 2)]
    pub compression_level: u32,
}

/// `--compression-min-bytes` ranges over this: below, deflate never makes a frame
/// smaller; above, nothing would be compressed (say `--compression off`).
const MIN_BYTES_RANGE: std::ops::RangeInclusive<usize> = 16..=(64 << 20);

impl CompressionConfig {
    /// Checks the ranges, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=9).contains(&self.compression_level) {
            return Err(ConfigError::new(
                "compression-level",
                format!(
                    "{} is out of range: 1 (fastest) to 9 (smallest); --compression off turns compression off",
                    self.compression_level
                ),
            ));
        }
        if !MIN_BYTES_RANGE.contains(&self.compression_min_bytes) {
            return Err(ConfigError::new(
                "compression-min-bytes",
                format!(
                    "{} is out of range: {} to {} bytes; --compression off turns compression off",
                    self.compression_min_bytes,
                    MIN_BYTES_RANGE.start(),
                    MIN_BYTES_RANGE.end()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = std::iter::once("wsrelay").chain(args.iter().copied());
        let config = Config::load_from(argv).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn defaults_and_switches() {
        let c = parse(&[]).unwrap().compression;
        assert!(c.compression);
        assert_eq!((c.compression_min_bytes, c.compression_level), (256, 2));
        for (args, on) in [
            (&["--compression", "off"][..], false),
            (&["--compression=false"][..], false),
            (&["--compression", "on"][..], true),
            (&["--compression"][..], true),
        ] {
            assert_eq!(parse(args).unwrap().compression.compression, on, "{args:?}");
        }
        let e = parse(&["--compression", "maybe"]).unwrap_err();
        assert!(e.contains("--compression"), "{e}");
    }

    #[test]
    fn ranges_are_checked_naming_the_flag() {
        for (args, flag) in [
            (&["--compression-level", "0"][..], "--compression-level"),
            (&["--compression-level", "10"][..], "--compression-level"),
            (&["--compression-level=-1"][..], "--compression-level"),
            (
                &["--compression-min-bytes", "15"][..],
                "--compression-min-bytes",
            ),
            (
                &["--compression-min-bytes", "100000000"][..],
                "--compression-min-bytes",
            ),
            (
                &["--compression-min-bytes", "x"][..],
                "--compression-min-bytes",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        let c = parse(&["--compression-level", "9", "--compression-min-bytes", "16"]).unwrap();
        assert_eq!(c.compression.compression_level, 9);
    }

    #[test]
    fn the_config_file_takes_a_boolean() {
        let path = std::env::temp_dir().join(format!(
            "wsrelay-compression-{}-{}.toml",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, "compression = false\ncompression-level = 6\n").unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        let c = c.unwrap().compression;
        assert!(!c.compression);
        assert_eq!(c.compression_level, 6);
    }
}
