//! The order saga's stock service: `inventory.reserve` takes every item of an order or none
//! (`stock.reserved` or `stock.insufficient`); `inventory.release` gives them back
//! (`stock.released`). Each SKU starts with `initial_stock` units (config, default 100).
//!
//! Idempotent: a repeated command answers what the first one did without touching the stock
//! again, and a release that arrives before its reservation blocks that reservation.

use std::collections::BTreeMap;

use flows::orders::*;
use serde::{Deserialize, Serialize};
use switchyard_sdk::{Collection, Error, Event, Metadata, Plugin, Result, config, log, publish};

/// Units available per SKU.
static STOCK: Collection<Stock> = Collection::new("stock");
/// What each order holds, keyed by order id.
static RESERVATIONS: Collection<Reservation> = Collection::new("reservations");

const DEFAULT_INITIAL_STOCK: u64 = 100;

#[derive(Debug, Serialize, Deserialize)]
struct Stock {
    available: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Held {
    Reserved,
    Refused,
    Released,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reservation {
    items: Vec<Item>,
    state: Held,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn available(sku: &str) -> Result<u64> {
    match STOCK.get(sku)? {
        Some(stock) => Ok(stock.available),
        None => config::parse_or("initial_stock", DEFAULT_INITIAL_STOCK),
    }
}

/// Answer a reservation as it stands.
fn answer(order: &flows::orders::OrderRef, reservation: &Reservation) -> Result<()> {
    match reservation.state {
        Held::Reserved => publish(STOCK_RESERVED, &OrderRef::new(&order.order_id)),
        Held::Refused => publish(
            STOCK_INSUFFICIENT,
            &OrderRef::because(&order.order_id, reservation.reason.clone().unwrap_or_default()),
        ),
        Held::Released => publish(STOCK_RELEASED, &OrderRef::new(&order.order_id)),
    }
    .map(drop)
}

fn reserve(event: &Event) -> Result<()> {
    let command: Reserve = event.json()?;
    let order = OrderRef::new(&command.order_id);
    let key = command.order_id.to_string();
    if let Some(existing) = RESERVATIONS.get(&key)? {
        let refusal = Reservation {
            items: command.items,
            state: Held::Refused,
            reason: Some("the order's stock was already released".into()),
        };
        let reservation = if existing.state == Held::Released { refusal } else { existing };
        answer(&order, &reservation)?;
        log::debug!("order {key}: repeated reserve answered {:?}", reservation.state);
        return Ok(());
    }
    let mut wanted = BTreeMap::new();
    for item in &command.items {
        *wanted.entry(item.sku.as_str()).or_insert(0u64) += u64::from(item.quantity);
    }
    let mut short = None;
    for (sku, quantity) in &wanted {
        if available(sku)? < *quantity {
            short = Some(format!("{sku} has fewer than {quantity} units"));
            break;
        }
    }
    let reservation = match short {
        Some(reason) => Reservation { items: command.items, state: Held::Refused, reason: Some(reason) },
        None => {
            for (sku, quantity) in &wanted {
                let left = available(sku)? - quantity;
                STOCK.put(sku, &Stock { available: left })?;
            }
            Reservation { items: command.items, state: Held::Reserved, reason: None }
        }
    };
    RESERVATIONS.put(&key, &reservation)?;
    answer(&order, &reservation)?;
    log::debug!("order {key}: {:?}", reservation.state);
    Ok(())
}

fn release(event: &Event) -> Result<()> {
    let command: OrderRef = event.json()?;
    let key = command.order_id.to_string();
    let reservation = match RESERVATIONS.get(&key)? {
        Some(r) if r.state == Held::Reserved => {
            for item in &r.items {
                let back = available(&item.sku)? + u64::from(item.quantity);
                STOCK.put(&item.sku, &Stock { available: back })?;
            }
            Reservation { state: Held::Released, ..r }
        }
        Some(r) => Reservation { state: Held::Released, ..r },
        None => Reservation { items: Vec::new(), state: Held::Released, reason: None },
    };
    RESERVATIONS.put(&key, &reservation)?;
    answer(&OrderRef::new(&command.order_id), &reservation)?;
    log::debug!("order {key}: released");
    Ok(())
}

struct Inventory;

impl Plugin for Inventory {
    fn metadata() -> Metadata {
        // One lane for all: reservations of different orders share SKUs.
        Metadata::new("inventory", env!("CARGO_PKG_VERSION")).subscribe([INVENTORY_RESERVE, INVENTORY_RELEASE])
    }

    fn handle(event: Event) -> Result<()> {
        match event.name.as_str() {
            INVENTORY_RESERVE => reserve(&event),
            INVENTORY_RELEASE => release(&event),
            other => Err(Error::reject(format!("no handler for {other}"))),
        }
    }
}

switchyard_sdk::plugin!(Inventory);
