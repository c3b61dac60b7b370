//! A property test of the trim rule against the real queries.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};
use jobs::TrimVisits;
use proptest::prelude::*;
use tests::TestDb;

/// Jobs waiting to run, by the step after which they run: (page, job, ids shown).
type Pending = BTreeMap<usize, Vec<(usize, TrimVisits, BTreeSet<i64>)>>;

/// One run: visits arrive with the given timestamps (ties allowed); after
/// each, the page is read and its job is queued to run `delays[i]` visits
/// later (or at the end). Always checked: a page shows min(10, all) visits and
/// its own job never deletes one it shows. With `in_order` timestamps (the
/// database's clock at insert, as in production), also: once every job ran,
/// the table holds exactly the newest 10 (plus visits tied with the 10th).
/// Returns a violation, if any.
async fn check(
    db: &TestDb,
    offsets: &[i64],
    delays: &[usize],
    in_order: bool,
) -> anyhow::Result<Option<String>> {
    sqlx::query("truncate visits restart identity")
        .execute(&db.pool)
        .await?;
    let base = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("valid");
    let mut pending = Pending::new();
    let run_due = async |pending: &mut Pending, step: usize| -> anyhow::Result<Option<String>> {
        for (page, job, shown) in pending.remove(&step).unwrap_or_default() {
            let deleted: BTreeSet<i64> = job.delete_older(&db.pool).await?.into_iter().collect();
            if let Some(id) = deleted.intersection(&shown).next() {
                return Ok(Some(format!(
                    "page {page}'s own job deleted visit {id} that it showed"
                )));
            }
        }
        Ok(None)
    };
    for (step, (offset, delay)) in offsets.iter().zip(delays).enumerate() {
        sqlx::query("insert into visits (visitor, created_at) values ('p', $1)")
            .bind(base + TimeDelta::milliseconds(*offset))
            .execute(&db.pool)
            .await?;
        let mut conn = db.pool.acquire().await?;
        let shown = web::visits::newest_visits(&mut conn).await?;
        let remaining: i64 = sqlx::query_scalar("select count(*) from visits")
            .fetch_one(&db.pool)
            .await?;
        if shown.len() as i64 != remaining.min(10) {
            return Ok(Some(format!(
                "page {step} shows {} visits of {remaining}",
                shown.len()
            )));
        }
        let threshold = web::visits::trim_threshold(&shown).expect("a visit was just inserted");
        let ids = shown.iter().map(|v| v.id).collect();
        pending.entry(step + delay).or_default().push((
            step,
            TrimVisits {
                older_than: threshold,
            },
            ids,
        ));
        if let Some(violation) = run_due(&mut pending, step).await? {
            return Ok(Some(violation));
        }
    }
    let later: Vec<usize> = pending.keys().copied().collect();
    for step in later {
        if let Some(violation) = run_due(&mut pending, step).await? {
            return Ok(Some(violation));
        }
    }
    if !in_order {
        // Out-of-order timestamps: a late job of an early page may delete a
        // visit that arrived later with an older time; only the page rules hold.
        return Ok(None);
    }
    // All jobs ran: what remains is the newest 10, plus visits tied with the 10th.
    let mut all: Vec<(i64, i64)> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| (*o, i as i64 + 1))
        .collect();
    all.sort_by(|a, b| b.cmp(a));
    let expected: BTreeSet<i64> = match all.get(9) {
        Some(&(tenth, _)) => all
            .iter()
            .filter(|(o, _)| *o >= tenth)
            .map(|(_, id)| *id)
            .collect(),
        None => all.iter().map(|(_, id)| *id).collect(),
    };
    let remaining: BTreeSet<i64> = db.visit_ids().await?.into_iter().collect();
    if remaining != expected {
        return Ok(Some(format!(
            "table holds {remaining:?}, expected the newest {expected:?}"
        )));
    }
    if offsets.iter().collect::<BTreeSet<_>>().len() == offsets.len()
        && remaining.len() != offsets.len().min(10)
    {
        return Ok(Some(format!(
            "distinct times must leave exactly 10, left {}",
            remaining.len()
        )));
    }
    Ok(None)
}

fn run_property(in_order: bool) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(TestDb::migrated()).expect("test database");
    // Gaps between arrivals: often distinct times, sometimes ties (gap 0).
    let strategy = (1usize..40).prop_flat_map(|n| {
        (
            proptest::collection::vec(prop_oneof![3 => 1i64..5_000, 1 => 0i64..2], n),
            proptest::collection::vec(0usize..6, n),
            proptest::collection::vec(0i64..100_000, n),
        )
    });
    let config = ProptestConfig {
        cases: 40,
        ..ProptestConfig::default()
    };
    proptest!(config, |((gaps, delays, shuffled) in strategy)| {
        let offsets: Vec<i64> = if in_order {
            gaps.iter().scan(0, |at, gap| { *at += gap; Some(*at) }).collect()
        } else {
            shuffled
        };
        let violation = runtime.block_on(check(&db, &offsets, &delays, in_order)).expect("database");
        prop_assert!(violation.is_none(), "{}", violation.unwrap_or_default());
    });
}

#[test]
fn with_insert_time_stamps_no_page_loses_what_it_shows_and_the_newest_ten_remain() {
    run_property(true);
}

#[test]
fn with_any_timestamps_no_page_ever_loses_what_it_shows_to_its_own_job() {
    run_property(false);
}
