//! Least privilege and secrets: the worker runs as a Postgres role with only REPLICATION
//! and SELECT on the published tables (the publications made by the DBA beforehand) and as a
//! Redis ACL user limited to its own keys and the commands it needs; its passwords come
//! from files and show up in no log and no `check-config` output.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_role_and_acl_user_with_secrets_from_files() {
    let shop = Shop::new("leastpriv").await;
    let role = format!("{}_vk", shop.prefix);
    let password = format!("pw-{}-x9", std::process::id());
    // The DBA's part: the role, read access to the published tables, the publications.
    let admin = shop.pg("catalog").await;
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'"
        ))
        .await
        .unwrap();
    for (svc, tables) in [
        ("identity", "customers"),
        ("catalog", "products"),
        ("ordering", "orders, order_items"),
    ] {
        shop.exec(
            svc,
            &format!(
                "GRANT SELECT ON {tables} TO {role};
                 CREATE PUBLICATION {0}_{svc} FOR TABLE {tables}",
                shop.prefix
            ),
        )
        .await;
    }
    // Redis: an ACL user that may touch only its own keys, with the commands it uses.
    acl_user(&shop, &role, &password).await;

    // The worker's URLs, passwords included, from files.
    let dir = shop.data_dir.path();
    let cfg = shop.config("");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    for svc in ["identity", "catalog", "ordering"] {
        let url = shop
            .db_url(svc)
            .replacen("postgres://postgres@", &format!("postgres://{role}:{password}@"), 1);
        std::fs::write(dir.join(format!("{svc}.url")), format!("{url}\n")).unwrap();
        text = text.replace(
            &format!("url = \"{}\"", shop.db_url(svc)),
            &format!("url = {{ file = \"{}\" }}", dir.join(format!("{svc}.url")).display()),
        );
    }
    let redis_url = servers()
        .redis
        .replacen("redis://", &format!("redis://{role}:{password}@"), 1);
    std::fs::write(dir.join("redis.url"), &redis_url).unwrap();
    text = text.replace(
        &format!("url = \"{}\"", servers().redis),
        &format!("url = {{ file = \"{}\" }}", dir.join("redis.url").display()),
    );
    std::fs::write(&cfg, &text).unwrap();
    assert!(!text.contains(&password));

    let shown = check_config(&cfg);
    assert!(shown.contains(&format!("{role}:***@")), "{shown}");
    assert!(!shown.contains(&password), "password shown by check-config");

    let w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'least', 1), (2, 'b', 'privilege', 2)",
    )
    .await;
    shop.exec("catalog", "UPDATE products SET status = 'decommissioned' WHERE id = 2")
        .await;
    converge(&shop, T).await;
    let log = w.log_text();
    assert!(!log.contains(&password), "password in the worker's log");
    drop(w);

    // Cleanup of what lives outside the shop's databases.
    drop_acl_user(&shop, &role).await;
    for svc in ["identity", "catalog", "ordering"] {
        shop.exec(svc, &format!("DROP OWNED BY {role}")).await;
    }
    // The slots belong to the databases (dropped with the shop); the role can go once
    // its walsenders are gone.
    wait_until("role dropped", T, || async {
        admin.batch_execute(&format!("DROP ROLE IF EXISTS {role}")).await.ok()
    })
    .await;
}

/// The throwaway CA of `scripts/services.sh` (`VK_TLS_CA` when the servers come from the
/// environment).
fn tls_ca() -> std::path::PathBuf {
    servers();
    let ca = std::env::var("VK_TLS_CA").map(Into::into).unwrap_or_else(|_| {
        let state = std::env::var("VIEWKEEPER_SERVICES_DIR").unwrap_or_else(|_| format!("{REPO}/.services"));
        std::path::PathBuf::from(state).join("tls/ca.crt")
    });
    assert!(
        ca.is_file(),
        "no CA file at {} (scripts/services.sh up makes it; or set VK_TLS_CA)",
        ca.display()
    );
    ca
}

/// Redis's TLS port, by the name in the server's certificate.
fn redis_tls_url() -> String {
    std::env::var("VK_REDIS_TLS_URL").unwrap_or_else(|_| "rediss://localhost:63800".into())
}

/// A CA that signed nothing the servers use.
fn other_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-subj", "/CN=some other CA", "-days", "2", "-keyout"])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(dir.join("other-ca.crt"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join("other-ca.crt")
}

/// An ACL user limited to the shop's keys and the commands the worker uses.
async fn acl_user(shop: &Shop, user: &str, password: &str) {
    let mut r = shop.redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{}:*", shop.prefix))
        .arg(
            &[
                "+@connection",
                "+hset",
                "+hget",
                "+del",
                "+expire",
                "+sadd",
                "+srem",
                "+evalsha",
                "+script|load",
                "+info",
                "+exists",
            ][..],
        )
        .query_async(&mut r)
        .await
        .unwrap();
}

async fn drop_acl_user(shop: &Shop, user: &str) {
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(user)
        .query_async(&mut shop.redis().await)
        .await
        .unwrap();
}

/// The shop's config with every Postgres URL given `query` (e.g. `sslmode=…`).
fn with_pg_query(shop: &Shop, cfg: &std::path::Path, query: impl Fn(&str) -> String) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    for svc in ["identity", "catalog", "ordering"] {
        let url = shop.db_url(svc);
        text = text.replace(&format!("url = \"{url}\""), &format!("url = \"{}\"", query(&url)));
    }
    std::fs::write(cfg, text).unwrap();
}

/// Runs the worker until it exits by itself (bounded by `T`): whether it succeeded, its log.
async fn run_to_exit(shop: &Shop, cfg: &std::path::Path) -> (bool, String) {
    let mut w = Worker::start(cfg, &shop.data_dir.path().join("data"));
    let status = wait_until("the worker exits", T, || {
        let r = w.child.try_wait().unwrap();
        async move { r }
    })
    .await;
    (status.success(), w.log_text())
}

/// Postgres with `sslmode=verify-full` and the test CA, Redis over TLS (`rediss://`, the
/// CA in `ca_file`) as an ACL user whose password comes from a file: the worker syncs
/// the shop, every replication stream and its Redis connection are encrypted, and the
/// password is in neither its log nor `check-config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_tls_to_postgres_and_redis() {
    let shop = Shop::new("tls").await;
    let ca = tls_ca();
    let user = format!("{}_tls", shop.prefix);
    let password = format!("tls-pw-{}-q7", std::process::id());
    acl_user(&shop, &user, &password).await;

    let dir = shop.data_dir.path();
    let cfg = shop.config("");
    with_pg_query(&shop, &cfg, |url| {
        format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display())
    });
    let redis_url = redis_tls_url().replacen("rediss://", &format!("rediss://{user}:{password}@"), 1);
    std::fs::write(dir.join("redis.url"), &redis_url).unwrap();
    url_from_file_with_ca(&cfg, &servers().redis, &dir.join("redis.url"), &ca);

    let shown = check_config(&cfg);
    assert!(shown.contains(&format!("rediss://{user}:***@")), "{shown}");
    assert!(shown.contains("sslmode=verify-full"), "{shown}");
    assert!(!shown.contains(&password), "password shown by check-config");

    let w = shop.worker(&cfg).await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'over', 1), (2, 'b', 'tls', 2)",
    )
    .await;
    shop.exec("catalog", "UPDATE products SET status = 'decommissioned' WHERE id = 2")
        .await;
    converge(&shop, T).await;

    // Every replication stream of the worker is encrypted.
    let like = format!("{}\\_%", shop.prefix.replace('_', "\\_"));
    let encrypted: i64 = shop
        .pg("catalog")
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid
             WHERE r.slot_name LIKE $1 AND s.ssl",
            &[&like],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(encrypted, 3, "replication streams over TLS");
    // The worker's Redis connection is the ACL user's, on the TLS port.
    let port = redis_url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut shop.redis().await)
        .await
        .unwrap();
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!(" user={user} ")) && l.contains(&format!("laddr=127.0.0.1:{port} "))),
        "no connection of {user} on the TLS port {port}:\n{clients}"
    );
    let log = w.log_text();
    assert!(!log.contains(&password), "password in the worker's log");
    drop(w);
    drop_acl_user(&shop, &user).await;
}

/// A server certificate signed by another CA, or not naming the host connected to, stops
/// the worker at once with the source's name and what to fix (it is not retried: it
/// would never heal by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_postgres_certificate_or_wrong_host_name_is_refused() {
    let shop = Shop::new("tlsbad").await;
    let ca = tls_ca();
    let other = other_ca(shop.data_dir.path());

    let cfg = shop.config("");
    with_pg_query(&shop, &cfg, |url| {
        format!("{url}?sslmode=verify-full&sslrootcert={}", other.display())
    });
    let (ok, err) = run_to_exit(&shop, &cfg).await;
    assert!(!ok, "the worker ran with an untrusted certificate:\n{err}");
    assert!(
        err.contains("source ")
            && err.contains("certificate is not trusted")
            && err.contains(&other.display().to_string()),
        "{err}"
    );

    // The right CA, but a host name the certificate does not carry (hostaddr: where to
    // connect; the name is what is checked, as in libpq).
    let cfg = shop.config("");
    let port = servers().pg.rsplit(':').next().unwrap().to_string();
    with_pg_query(&shop, &cfg, |url| {
        format!(
            "{}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            url.replacen(&format!("127.0.0.1:{port}"), &format!("db.invalid:{port}"), 1),
            ca.display()
        )
    });
    let (ok, err) = run_to_exit(&shop, &cfg).await;
    assert!(!ok, "the worker ran with a certificate for another name:\n{err}");
    assert!(
        err.contains("source ") && err.contains(&format!("does not name host db.invalid:{port}")),
        "{err}"
    );
}

/// Redis over TLS with a CA that did not sign its certificate: the sink is not used, and
/// the worker says why, naming the sink, while it retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_redis_certificate_is_reported() {
    let shop = Shop::new("tlsredis").await;
    tls_ca();
    let other = other_ca(shop.data_dir.path());
    let cfg = shop.config("");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("url = \"{}\"", servers().redis),
        &format!("url = \"{}\"\nca_file = \"{}\"", redis_tls_url(), other.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let w = Worker::start(&cfg, &shop.data_dir.path().join("data"));
    let line = wait_until("the worker reports the untrusted Redis certificate", T, || async {
        w.log_text()
            .lines()
            .find(|l| l.contains("sink unreachable") && l.contains("\"sink\":\"cache\""))
            .map(str::to_string)
    })
    .await;
    assert!(line.contains("certificate"), "{line}");
}

/// The HTTPS front of the search server (nginx with basic auth, `scripts/services.sh`):
/// its URL and the password of user `viewkeeper`.
fn search_tls() -> (String, String) {
    servers();
    let url = std::env::var("VK_OPENSEARCH_TLS_URL").unwrap_or_else(|_| "https://localhost:19243".into());
    let file = std::env::var("VK_OPENSEARCH_TLS_PASSWORD_FILE").unwrap_or_else(|_| {
        let state = std::env::var("VIEWKEEPER_SERVICES_DIR").unwrap_or_else(|_| format!("{REPO}/.services"));
        format!("{state}/opensearch-tls/password")
    });
    let password = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{file}: {e} (scripts/services.sh up opensearch makes it)"));
    (url, password.trim().to_string())
}

/// The search sink over HTTPS (certificate checked against the test CA, host name
/// included) with basic auth from a secret file: orders reach the index, `verify` reads
/// it back through the same path and finds it clean, and the password is in neither the
/// log nor `check-config`. With a wrong password the server answers 401 and the worker
/// says so, naming the sink, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_over_https_with_basic_auth() {
    let shop = Shop::new("https").await;
    let ca = tls_ca();
    let (url, password) = search_tls();
    let dir = shop.data_dir.path();
    let sink_url = |pw: &str| url.replacen("https://", &format!("https://viewkeeper:{pw}@"), 1);
    std::fs::write(dir.join("search.url"), sink_url(&password)).unwrap();
    let cfg = shop.config("");
    url_from_file_with_ca(&cfg, &servers().search, &dir.join("search.url"), &ca);
    let shown = check_config(&cfg);
    assert!(shown.contains("https://viewkeeper:***@"), "{shown}");
    assert!(!shown.contains(&password), "password shown by check-config");

    let w = shop.worker(&cfg).await;
    shop.exec(
        "identity",
        "INSERT INTO customers(id, name, email) VALUES (1, 'Ada', 'ada@example.com')",
    )
    .await;
    shop.exec(
        "catalog",
        "INSERT INTO products(id, sku, name, price) VALUES (1, 'a', 'lamp', 12.50)",
    )
    .await;
    shop.exec(
        "ordering",
        "BEGIN; INSERT INTO orders(id, customer_id, status, total) VALUES (1, 1, 'new', 25.00);
         INSERT INTO order_items VALUES (1, 1, 1, 2, 12.50); COMMIT",
    )
    .await;
    let doc = wait_until("the order indexed through HTTPS", T, || async {
        common::orders::actual(&shop).await.ok()?.remove("1")
    })
    .await;
    assert_eq!(doc["customer"]["email"], "ada@example.com", "{doc}");
    converge(&shop, T).await;
    let verify = shop.viewkeeper(&cfg, &["verify"]);
    assert!(
        verify.status.success(),
        "verify over HTTPS: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let log = w.log_text();
    assert!(!log.contains(&password), "password in the worker's log");
    drop(w);

    // A wrong password: 401 from the server, reported with the sink's name.
    let wrong = format!("{password}-wrong");
    std::fs::write(dir.join("search.url"), sink_url(&wrong)).unwrap();
    let w = Worker::start(&cfg, &dir.join("data"));
    let line = wait_until("the worker reports the refused credentials", T, || async {
        w.log_text()
            .lines()
            .find(|l| l.contains("sink unreachable") && l.contains("\"sink\":\"search\""))
            .map(str::to_string)
    })
    .await;
    assert!(line.contains("401"), "{line}");
    assert!(!w.log_text().contains(&wrong), "password in the worker's log");
}

/// `viewkeeper check-config` over `cfg`: must succeed; its output.
fn check_config(cfg: &std::path::Path) -> String {
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["check-config", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    String::from_utf8_lossy(&check.stdout).into_owned()
}

/// Points the sink whose url is `old` at the secret in `file`, verified with `ca`.
fn url_from_file_with_ca(cfg: &std::path::Path, old: &str, file: &std::path::Path, ca: &std::path::Path) {
    let text = std::fs::read_to_string(cfg).unwrap().replace(
        &format!("url = \"{old}\""),
        &format!(
            "url = {{ file = \"{}\" }}\nca_file = \"{}\"",
            file.display(),
            ca.display()
        ),
    );
    std::fs::write(cfg, text).unwrap();
}
