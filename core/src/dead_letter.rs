//! Dead letters: data that could not apply, render or be written, never dropped silently.
//! Each says where it came from (source, position, table, key), at which [`Stage`] it
//! failed, why, and what it was (the payload, when there is one to replay).

use std::fmt;
use std::str::FromStr;

/// Where in the pipeline a dead letter was made; decides what `dlq replay` does with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The source could not turn it into a change (the payload is the record).
    #[default]
    Decode,
    /// The change could not be applied whole (e.g. an unchanged TOAST value with no stored
    /// value to take it from).
    Apply,
    /// A document of `projection` could not be rendered from the row.
    Render { projection: String },
    /// `sink` refused a document of `projection` for good.
    Sink { sink: String, projection: String },
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Decode => f.write_str("decode"),
            Stage::Apply => f.write_str("apply"),
            Stage::Render { projection } => write!(f, "render:{projection}"),
            Stage::Sink { sink, projection } => write!(f, "sink:{sink}:{projection}"),
        }
    }
}

/// A stage's text that is none of the known forms.
#[derive(Debug, thiserror::Error)]
#[error("unknown dead-letter stage '{0}'")]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownStage(s.to_string());
        match s.split_once(':') {
            None if s == "decode" => Ok(Stage::Decode),
            None if s == "apply" => Ok(Stage::Apply),
            Some(("render", p)) if !p.is_empty() => Ok(Stage::Render {
                projection: p.to_string(),
            }),
            Some(("sink", rest)) => match rest.split_once(':') {
                Some((sink, projection)) if !sink.is_empty() && !projection.is_empty() => Ok(Stage::Sink {
                    sink: sink.to_string(),
                    projection: projection.to_string(),
                }),
                _ => Err(unknown()),
            },
            _ => Err(unknown()),
        }
    }
}

impl serde::Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A dead letter. `id` and `at_ms` are assigned on insert (0 means "now").
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub at_ms: i64,
    pub source: String,
    pub position: String,
    pub table: String,
    pub key: String,
    pub stage: Stage,
    pub reason: String,
    pub payload: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_read_back_what_they_write() {
        for s in [
            Stage::Decode,
            Stage::Apply,
            Stage::Render {
                projection: "orders_view".into(),
            },
            Stage::Sink {
                sink: "search".into(),
                projection: "orders_view".into(),
            },
        ] {
            assert_eq!(s.to_string().parse::<Stage>().unwrap(), s);
        }
        assert!("render:".parse::<Stage>().is_err());
        assert!("sink:x".parse::<Stage>().is_err());
        assert!("nope".parse::<Stage>().is_err());
    }
}
