//! Preparing a (re)connection: the server's `wal_level`, each table's replica identity,
//! the publication (created, or completed with missing tables; partitioned tables
//! published via their root) and the slot (created when missing; refused when it is gone
//! while the state store has a checkpoint). What it finds decides how streaming starts.

use super::{errors, quote_ident, quote_table, PgSource, Start};
use pgwire_replication::Lsn;
use tracing::info;
use viewkeeper_core::model::Position;
use viewkeeper_core::source::SourceError;
use viewkeeper_core::ErrorKind;

impl PgSource {
    /// Checks the server and creates the publication and slot when missing.
    pub(super) async fn prepare(&self, has_checkpoint: bool) -> Result<Start, SourceError> {
        self.on_connection("postgres", async |c| self.prepare_on(c, has_checkpoint).await)
            .await
    }

    async fn prepare_on(&self, c: &tokio_postgres::Client, has_checkpoint: bool) -> Result<Start, SourceError> {
        let sql = |e: tokio_postgres::Error| self.sql_error("query failed", &e);
        let wal: String = c.query_one("SHOW wal_level", &[]).await.map_err(sql)?.get(0);
        if wal != "logical" {
            return Err(self.error(ErrorKind::Unfit, format!(
                "wal_level is '{wal}'; logical replication needs wal_level = logical (set it in postgresql.conf and restart Postgres)"
            )));
        }
        let mut tables: Vec<&String> = self.run.tables.keys().collect();
        tables.sort();
        let mut partitioned = Vec::new();
        for t in &tables {
            let row = c
                .query_opt(
                    "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                            c.relkind = 'p'
                     FROM pg_class c WHERE c.oid = to_regclass($1)",
                    &[&quote_table(t)],
                )
                .await
                .map_err(sql)?;
            let Some(row) = row else {
                return Err(self.error(
                    ErrorKind::Unfit,
                    format!(
                        "table {t} does not exist in this database; create it or fix tables.*.name for source {}",
                        self.name
                    ),
                ));
            };
            let ident: String = row.get(0);
            let has_pk: bool = row.get(1);
            if row.get::<_, bool>(2) {
                partitioned.push(t.to_string());
            }
            if ident == "n" || (ident == "d" && !has_pk) {
                return Err(self.error(ErrorKind::Unfit, format!(
                    "table {t} has no replica identity, so its updates and deletes cannot be identified; add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
                    quote_table(t)
                )));
            }
        }
        let exists = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(sql)?
            .is_some();
        let list = tables.iter().map(|t| quote_table(t)).collect::<Vec<_>>().join(", ");
        if !exists {
            // A partitioned table is one table: its partitions' changes are published under
            // the root's name (and a row moving between partitions is a delete and an insert
            // of it), and the snapshot reads the root.
            info!(source = %self.name, publication = %self.cfg.publication, tables = %list, "creating publication");
            c.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                quote_ident(&self.cfg.publication)
            ))
            .await
            .map_err(|e| self.ddl_failed(&format!("cannot create publication {}", self.cfg.publication), &e))?;
        } else {
            let via_root: bool = c
                .query_one(
                    "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                    &[&self.cfg.publication],
                )
                .await
                .map_err(sql)?
                .get(0);
            if !via_root && !partitioned.is_empty() {
                info!(source = %self.name, publication = %self.cfg.publication, tables = ?partitioned,
                    "partitioned tables: publishing their changes under the root's name");
                c.batch_execute(&format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(&self.cfg.publication)
                ))
                .await
                .map_err(|e| {
                    self.error(errors::kind_of_sql(&e), format!(
                        "publication {} publishes the partitions of {} under their own names, which no table of the config has: run ALTER PUBLICATION {} SET (publish_via_partition_root = true) as its owner ({e})",
                        self.cfg.publication,
                        partitioned.join(", "),
                        quote_ident(&self.cfg.publication)
                    ))
                })?;
            }
            let rows = c
                .query(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                    &[&self.cfg.publication],
                )
                .await
                .map_err(sql)?;
            let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let missing: Vec<String> = tables
                .iter()
                .filter(|t| !have.contains(t))
                .map(|t| quote_table(t))
                .collect();
            if !missing.is_empty() {
                info!(source = %self.name, publication = %self.cfg.publication, tables = ?missing, "adding tables to publication");
                c.batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(&self.cfg.publication),
                    missing.join(", ")
                ))
                .await
                .map_err(|e| {
                    self.ddl_failed(
                        &format!("cannot add tables to publication {}", self.cfg.publication),
                        &e,
                    )
                })?;
            }
        }
        let slot = c
            .query_opt(
                "SELECT plugin, coalesce(wal_status, ''), database, coalesce(confirmed_flush_lsn, '0/0')::text
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(sql)?;
        match slot {
            None if has_checkpoint => Err(self.error(ErrorKind::SlotLost, format!(
                "replication slot {} is missing but the state store has a checkpoint for this source: changes since then are lost to the slot. \
                 Rebuild with `viewkeeper backfill` (or drop the data dir to start over); viewkeeper never silently restarts from a new slot",
                self.cfg.slot
            ))),
            Some(r) if !has_checkpoint && self.run.initial_snapshot => {
                // No checkpoint yet: the initial snapshot is not complete. Resume it.
                let lsn: String = r.get(3);
                let cp = Lsn::parse(&lsn).map_err(|e| self.error(ErrorKind::Unfit, format!("slot {}: bad confirmed_flush_lsn {lsn}: {e}", self.cfg.slot)))?;
                Ok(Start::Snapshot { cp: Position::new(cp.as_u64(), 0), fresh: false })
            }
            None if self.run.initial_snapshot => {
                info!(source = %self.name, slot = %self.cfg.slot, "creating replication slot");
                let lsn: String = c
                    .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.cfg.slot])
                    .await
                    .map_err(|e| self.ddl_failed(&format!("cannot create replication slot {}", self.cfg.slot), &e))?
                    .get(0);
                let cp = Lsn::parse(&lsn).map_err(|e| self.error(ErrorKind::Unfit, format!("slot {}: bad lsn {lsn}: {e}", self.cfg.slot)))?;
                Ok(Start::Snapshot { cp: Position::new(cp.as_u64(), 0), fresh: true })
            }
            None => {
                info!(source = %self.name, slot = %self.cfg.slot, "creating replication slot");
                c.query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.cfg.slot])
                    .await
                    .map_err(|e| self.ddl_failed(&format!("cannot create replication slot {}", self.cfg.slot), &e))?;
                Ok(Start::Stream)
            }
            Some(r) => {
                let plugin: String = r.get(0);
                let status: String = r.get(1);
                if plugin != "pgoutput" {
                    return Err(self.error(ErrorKind::Unfit, format!(
                        "replication slot {} uses plugin {plugin}, not pgoutput; drop it or name another slot in sources.{}.slot",
                        self.cfg.slot, self.name
                    )));
                }
                if status == "lost" {
                    return Err(self.error(ErrorKind::SlotLost, format!(
                        "replication slot {} is invalidated (wal_status = lost): Postgres removed WAL it still needed. Rebuild with `viewkeeper backfill`",
                        self.cfg.slot
                    )));
                }
                Ok(Start::Stream)
            }
        }
    }
}
impl PgSource {
    /// A DDL statement that failed: a missing permission stops the worker (with who must
    /// run it), a lost connection is retried.
    fn ddl_failed(&self, what: &str, e: &tokio_postgres::Error) -> SourceError {
        let kind = errors::kind_of_sql(e);
        let fix = match kind {
            ErrorKind::Denied => {
                "; the source's user may not do it: have the DBA run it (see the README's least-privilege section)"
            }
            _ => "",
        };
        self.error(kind, format!("{what}: {}{fix}", super::connect::error_chain(e)))
    }
}
