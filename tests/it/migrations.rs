//! The migration rule of README "Deploying and rolling back": each release's schema must still
//! run the previous release's binary (expand now, contract one release later). A statement
//! that can break the previous binary — dropping or renaming a table, column, index or
//! constraint, changing a column's type, making a column `NOT NULL`, or adding a `NOT NULL`
//! column without a default to an existing table — is allowed only in a migration that says
//! why it is safe on a line of its own: `-- contract: <why>` (the previous release no longer
//! uses what goes, or the change cannot affect it).

use std::path::Path;

/// Migrations written before the rule, each reviewed: their destructive statements are safe
/// for the release before them. (Applied migrations cannot be edited to add the marker: sqlx
/// checks their checksums.)
const REVIEWED_BEFORE_THE_RULE: &[(&str, &str)] = &[(
    "20261129200000_security_events_cursor.sql",
    "drops an index that the same migration replaces with a wider one",
)];

/// What makes a statement destructive, with a name for the failure message.
fn destructive(statement: &str) -> Vec<&'static str> {
    let s = statement.to_ascii_lowercase();
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut found = Vec::new();
    for (needle, what) in [
        ("drop table", "DROP TABLE"),
        ("drop column", "DROP COLUMN"),
        ("drop index", "DROP INDEX"),
        ("drop constraint", "DROP CONSTRAINT"),
        ("drop type", "DROP TYPE"),
        ("drop view", "DROP VIEW"),
        (" rename ", "RENAME"),
        ("set not null", "SET NOT NULL"),
        ("set data type", "a column type change"),
        ("truncate ", "TRUNCATE"),
    ] {
        if s.contains(needle) {
            found.push(what);
        }
    }
    if s.contains("alter column") && s.contains(" type ") {
        found.push("a column type change");
    }
    // `ALTER TABLE … ADD COLUMN x … NOT NULL` without a DEFAULT fails on a table with rows, and
    // the previous binary's INSERTs do not name the column.
    if s.starts_with("alter table") {
        for clause in s.split(" add column ").skip(1) {
            let definition = clause.split(", add ").next().unwrap_or(clause);
            if definition.contains("not null") && !definition.contains("default") {
                found.push("ADD COLUMN … NOT NULL without DEFAULT");
            }
        }
    }
    found
}

/// The statements of a migration, comments removed (`--` to the end of the line). Bodies of
/// `$$ … $$` blocks are kept: dynamic SQL in them is checked too.
fn statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .map(|line| match line.find("--") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn destructive_migrations_say_why_they_are_safe_for_the_previous_release() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the migrations are found");
    let mut problems = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let sql = std::fs::read_to_string(path).expect("read a migration");
        let marked = sql.lines().any(|l| {
            l.trim_start()
                .strip_prefix("-- contract:")
                .is_some_and(|why| !why.trim().is_empty())
        });
        let reviewed = REVIEWED_BEFORE_THE_RULE.iter().any(|(f, _)| *f == name);
        for statement in statements(&sql) {
            let found = destructive(&statement);
            if !found.is_empty() && !marked && !reviewed {
                problems.push(format!(
                    "{name}: {} in `{}`",
                    found.join(", "),
                    statement.lines().next().unwrap_or_default()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "destructive statements without a `-- contract: <why>` line (README \"Deploying and rolling back\"):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_lint_catches_each_destructive_shape_and_passes_expanding_ones() {
    for bad in [
        "DROP TABLE messages",
        "ALTER TABLE users DROP COLUMN email",
        "ALTER TABLE users RENAME COLUMN email TO mail",
        "ALTER TABLE users RENAME TO people",
        "ALTER TABLE users ALTER COLUMN email SET NOT NULL",
        "ALTER TABLE users ALTER COLUMN email TYPE varchar(10)",
        "ALTER TABLE users ADD COLUMN nickname text NOT NULL",
        "ALTER TABLE users ADD COLUMN a text, ADD COLUMN b int NOT NULL",
        "DROP INDEX users_email_idx",
        "ALTER TABLE users DROP CONSTRAINT users_email_key",
        "TRUNCATE outbox",
    ] {
        assert!(!destructive(bad).is_empty(), "{bad}");
    }
    for good in [
        "CREATE TABLE t (id uuid PRIMARY KEY, name text NOT NULL)",
        "ALTER TABLE users ADD COLUMN nickname text",
        "ALTER TABLE users ADD COLUMN active boolean NOT NULL DEFAULT true",
        "CREATE INDEX users_name_idx ON users (name)",
        "ALTER TABLE users ADD CONSTRAINT c CHECK (length(email) < 320)",
    ] {
        assert!(
            destructive(good).is_empty(),
            "{good}: {:?}",
            destructive(good)
        );
    }
    assert_eq!(
        statements("-- DROP TABLE x;\nCREATE TABLE y (a int); -- RENAME\n"),
        vec!["CREATE TABLE y (a int)".to_owned()]
    );
}
