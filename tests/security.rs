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
    let mut r = shop.redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&role)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{}:*", shop.prefix))
        .arg("+@connection")
        .arg("+hset")
        .arg("+hget")
        .arg("+del")
        .arg("+expire")
        .arg("+sadd")
        .arg("+srem")
        .arg("+evalsha")
        .arg("+script|load")
        .query_async(&mut r)
        .await
        .unwrap();

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

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_viewkeeper"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let shown = String::from_utf8_lossy(&check.stdout);
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
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&role)
        .query_async(&mut r)
        .await
        .unwrap();
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
