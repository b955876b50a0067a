//! `--map`: another biller's customer and price ids as Tally's. In: a CSV file with the
//! header `kind,from,to`; out: an [`IdMap`] that renames a line's key, or leaves the
//! line of a price Tally does not bill out.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::files::{csv_error, LineNumbers};
use super::lines::LineKey;

/// Another biller's customer and price ids, as Tally's.
#[derive(Debug, Default)]
pub(super) struct IdMap {
    customers: HashMap<String, String>,
    prices: HashMap<String, String>,
    /// The other biller's prices Tally does not bill (tax, a rounding line): their
    /// lines are left out.
    pub(super) left_out_prices: BTreeSet<String>,
}

impl IdMap {
    pub(super) fn read(path: &Path) -> anyhow::Result<IdMap> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the map {}", path.display()))?;
        IdMap::parse(&path.display().to_string(), &text)
    }

    /// A CSV file with the header `kind,from,to`; `kind` is `customer` or `price`, and
    /// a price with no `to` is left out.
    pub(super) fn parse(name: &str, text: &str) -> anyhow::Result<IdMap> {
        #[derive(Deserialize)]
        struct Entry {
            kind: String,
            from: String,
            to: String,
        }
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let headers = (reader.headers())
            .with_context(|| format!("{name}: cannot read the header row"))?
            .clone();
        anyhow::ensure!(
            ["kind", "from", "to"]
                .iter()
                .all(|c| headers.iter().any(|h| h == *c)),
            "{name}: the header row must name kind, from and to (it has {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        );
        let mut map = IdMap::default();
        // Where each id was mapped, for naming a contradiction.
        let mut first_at: HashMap<(String, String), String> = HashMap::new();
        let mut lines = LineNumbers::of(text);
        for record in reader.records() {
            let record = record.with_context(|| format!("{name}: unreadable row"))?;
            let at = format!("{name} line {}", lines.at(record.position()));
            let entry: Entry = (record.deserialize(Some(&headers)))
                .map_err(|e| anyhow::anyhow!("{at}: {}", csv_error(&e, &headers)))?;
            let (kind, from, to) = (entry.kind.trim(), entry.from.trim(), entry.to.trim());
            anyhow::ensure!(
                matches!(kind, "customer" | "price"),
                "{at}: kind {kind:?} is neither customer nor price"
            );
            anyhow::ensure!(!from.is_empty(), "{at}: from must be given");
            let is_price = kind == "price";
            if to.is_empty() {
                anyhow::ensure!(
                    is_price,
                    "{at}: to must be given for a customer; only a price may be left out (no to), as one Tally does not bill"
                );
                anyhow::ensure!(
                    !map.prices.contains_key(from),
                    "{at}: price {from:?} is both mapped and left out"
                );
                map.left_out_prices.insert(from.to_owned());
                continue;
            }
            anyhow::ensure!(
                !(is_price && map.left_out_prices.contains(from)),
                "{at}: price {from:?} is both mapped and left out"
            );
            let ids = match is_price {
                true => &mut map.prices,
                false => &mut map.customers,
            };
            match ids.get(from) {
                Some(earlier) if earlier != to => bail!(
                    "{at}: {kind} {from:?} is mapped to {to:?} here and to {earlier:?} at {}",
                    first_at[&(kind.to_owned(), from.to_owned())]
                ),
                _ => {
                    ids.insert(from.to_owned(), to.to_owned());
                    first_at.insert((kind.to_owned(), from.to_owned()), at);
                }
            }
        }
        Ok(map)
    }

    /// Renames the key's customer and price where the map says; whether it did. The
    /// entries it followed go into `used`, as [`IdMap::entries`] names them.
    pub(super) fn rename(&self, key: &mut LineKey, used: &mut BTreeSet<String>) -> bool {
        let mut renamed = false;
        for (kind, id, ids) in [
            ("customer", &mut key.customer, &self.customers),
            ("price", &mut key.price, &self.prices),
        ] {
            if let Some(to) = ids.get(id.as_str()) {
                used.insert(format!("{kind} {id}"));
                renamed |= to != id;
                id.clone_from(to);
            }
        }
        renamed
    }

    /// Every entry, as `customer ID` or `price ID` (its `from`).
    pub(super) fn entries(&self) -> impl Iterator<Item = String> + '_ {
        let named = |kind: &'static str| move |id: &String| format!("{kind} {id}");
        (self.customers.keys().map(named("customer")))
            .chain(self.prices.keys().map(named("price")))
            .chain(self.left_out_prices.iter().map(named("price")))
    }
}
