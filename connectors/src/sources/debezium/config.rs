//! `[sources.NAME]` with `kind = "debezium"`: a Debezium connector's topics in Kafka.

use super::consumer::OWN_PROPERTIES;
use super::group::Assignment;
use super::values::ColumnType;
use serde::Deserialize;
use std::collections::BTreeMap;
use viewkeeper_core::secret::KafkaProperties;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:19092`.
    pub brokers: String,
    /// The connector's `topic.prefix`: table `schema.table` is read from
    /// `<topic_prefix>.<schema>.<table>` unless `topics` names another topic.
    pub topic_prefix: String,
    /// How the topics are assigned to the workers of the group ([`Assignment`]):
    /// `whole` (default), `partitioned` or `shared`.
    #[serde(default)]
    pub assignment: Assignment,
    /// Consumer group; default `viewkeeper-<source name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Table name (`[tables.NAME]`) → topic, where Debezium's naming is not used.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// Table name → column → type, for topics without schemas (`schemas.enable=false`):
    /// e.g. `products = { price = "decimal(2)" }`. A schema in the message wins.
    #[serde(default)]
    pub column_types: BTreeMap<String, BTreeMap<String, String>>,
    /// Extra librdkafka consumer properties (security, fetch sizes, …); secret ones are
    /// redacted in `Debug` / `check-config` (see [`KafkaProperties`]).
    #[serde(default)]
    pub properties: KafkaProperties,
    #[serde(default = "DebeziumConfig::default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Records per batch at most.
    #[serde(default = "DebeziumConfig::default_max_batch_records")]
    pub max_batch_records: usize,
    /// On a rebalance, how long to wait for the engine to acknowledge what was read
    /// before the partitions go (what is not acknowledged by then is replayed).
    #[serde(default = "DebeziumConfig::default_revoke_timeout_ms")]
    pub revoke_timeout_ms: u64,
}

impl DebeziumConfig {
    fn default_session_timeout_ms() -> u64 {
        10_000
    }
    fn default_max_batch_records() -> usize {
        5_000
    }
    fn default_revoke_timeout_ms() -> u64 {
        30_000
    }

    /// The topic of table `alias` (`schema.table` `name`).
    pub fn topic_of(&self, alias: &str, name: &str) -> String {
        self.topics
            .get(alias)
            .cloned()
            .unwrap_or_else(|| format!("{}.{name}", self.topic_prefix))
    }

    /// The consumer group of source `name`.
    pub fn group(&self, name: &str) -> String {
        self.group_id.clone().unwrap_or_else(|| format!("viewkeeper-{name}"))
    }

    /// Problems of source `name`, each starting with its key path `path`; `own` says
    /// whether a table name reads from this source.
    pub fn validate(&self, path: &str, name: &str, own: &dyn Fn(&str) -> bool, out: &mut Vec<String>) {
        if self.brokers.trim().is_empty() {
            out.push(format!("{path}.brokers: empty; e.g. brokers = \"127.0.0.1:19092\""));
        }
        if self.topic_prefix.trim().is_empty() {
            out.push(format!(
                "{path}.topic_prefix: empty; the Debezium connector's topic.prefix, e.g. \"catalog\""
            ));
        }
        if self.max_batch_records == 0 {
            out.push(format!("{path}.max_batch_records: must be at least 1"));
        }
        for t in self.topics.keys().filter(|t| !own(t)) {
            out.push(format!("{path}.topics.{t}: no table '{t}' reads from source '{name}'"));
        }
        for (t, cols) in &self.column_types {
            if !own(t) {
                out.push(format!(
                    "{path}.column_types.{t}: no table '{t}' reads from source '{name}'"
                ));
            }
            for (c, ty) in cols {
                if let Err(e) = ColumnType::from_hint(ty) {
                    out.push(format!("{path}.column_types.{t}.{c}: {e}"));
                }
            }
        }
        for k in self.properties.keys() {
            if OWN_PROPERTIES.contains(&k.as_str()) {
                out.push(format!("{path}.properties.{k}: set by viewkeeper itself (use the source's own keys: brokers, group_id, session_timeout_ms)"));
            }
        }
    }
}
