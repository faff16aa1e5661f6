//! The order saga's orchestrator (seed 003). It keeps each order's saga in its store and
//! publishes the next command: reserve stock, then take payment, then confirm. A refused
//! reservation cancels; a failed or late payment compensates (cancel the order, release the
//! stock). A reservation not paid within `payment_timeout_ms` (config, default 30000) expires
//! through a delayed `order.payment-timeout` and compensates the same way; a payment that
//! succeeds after that is refunded.
//!
//! Every step checks the saga's state first, so a duplicate or out-of-order event changes
//! nothing, and events of one order are handled in order (ordering key `orderId`).

use flows::orders::*;
use serde::{Deserialize, Serialize};
use switchyard_sdk::{Collection, Error, Event, Id, Metadata, Outgoing, Plugin, Result, config, log, publish};

/// One saga per order, keyed by order id.
static SAGAS: Collection<Saga> = Collection::new("sagas");

/// Reservation time when the config sets no `payment_timeout_ms`.
const DEFAULT_PAYMENT_TIMEOUT_MS: u64 = 30_000;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    /// `inventory.reserve` sent.
    Reserving,
    /// Stock reserved, `payment.initiate` sent, expiry scheduled.
    Paying,
    /// Paid: `order.confirmed` sent.
    Confirmed,
    /// Payment failed or expired: `order.cancelled` and `inventory.release` sent.
    Compensating,
    /// Cancelled; the stock, if it was reserved, is released.
    Cancelled,
}

/// A `sagas` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saga {
    order_id: Id,
    amount: u64,
    items: Vec<Item>,
    step: Step,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// A payment arrived after the saga was compensated, and was refunded.
    #[serde(default)]
    refunded: bool,
    /// Each event that moved the saga, in order: `"stock.reserved -> paying"`.
    path: Vec<String>,
}

impl Step {
    /// The step's name, as stored.
    fn as_str(self) -> &'static str {
        match self {
            Step::Reserving => "reserving",
            Step::Paying => "paying",
            Step::Confirmed => "confirmed",
            Step::Compensating => "compensating",
            Step::Cancelled => "cancelled",
        }
    }
}

impl Saga {
    fn to(&mut self, step: Step, cause: &str) {
        self.step = step;
        self.path.push(format!("{cause} -> {}", step.as_str()));
    }
}

/// Cancel the order and release its stock.
fn compensate(saga: &mut Saga, cause: &str, reason: String) -> Result<()> {
    publish(ORDER_CANCELLED, &OrderRef::because(&saga.order_id, reason.clone()))?;
    publish(INVENTORY_RELEASE, &OrderRef::new(&saga.order_id))?;
    saga.reason = Some(reason);
    saga.to(Step::Compensating, cause);
    Ok(())
}

/// Move the saga of `event`'s order, and say what happened in a `debug` line.
fn advance(event: &Event) -> Result<()> {
    let name = event.name.as_str();
    if name == ORDER_CREATED {
        let order: OrderCreated = event.json()?;
        let key = order.order_id.to_string();
        if SAGAS.get(&key)?.is_some() {
            log::debug!("order {key} already has a saga: duplicate ignored");
            return Ok(());
        }
        if order.items.is_empty() {
            return Err(Error::reject(format!("order {key} has no items")));
        }
        publish(INVENTORY_RESERVE, &Reserve { order_id: order.order_id.clone(), items: order.items.clone() })?;
        let mut saga = Saga {
            order_id: order.order_id,
            amount: order.amount,
            items: order.items,
            step: Step::Reserving,
            reason: None,
            refunded: false,
            path: Vec::new(),
        };
        saga.to(Step::Reserving, name);
        SAGAS.put(&key, &saga)?;
        log::debug!("order {key}: reserving stock");
        return Ok(());
    }
    let reply: OrderRef = event.json()?;
    let key = reply.order_id.to_string();
    let Some(mut saga) = SAGAS.get(&key)? else {
        // A reply before the saga exists cannot come from this saga's commands.
        return Err(Error::reject(format!("{name} for order {key}, which has no saga")));
    };
    let before = saga.step;
    match (name, saga.step) {
        (STOCK_RESERVED, Step::Reserving) => {
            publish(PAYMENT_INITIATE, &Charge { order_id: saga.order_id.clone(), amount: saga.amount })?;
            Outgoing::new(PAYMENT_TIMEOUT, &OrderRef::new(&saga.order_id))?
                .delay_ms(config::parse_or("payment_timeout_ms", DEFAULT_PAYMENT_TIMEOUT_MS)?)
                .send()?;
            saga.to(Step::Paying, name);
        }
        (STOCK_INSUFFICIENT, Step::Reserving) => {
            let reason = format!("insufficient stock: {}", reply.reason.unwrap_or_default());
            publish(ORDER_CANCELLED, &OrderRef::because(&saga.order_id, reason.clone()))?;
            saga.reason = Some(reason);
            saga.to(Step::Cancelled, name);
        }
        (PAYMENT_SUCCEEDED, Step::Paying) => {
            publish(ORDER_CONFIRMED, &OrderRef::new(&saga.order_id))?;
            saga.to(Step::Confirmed, name);
        }
        (PAYMENT_SUCCEEDED, Step::Compensating | Step::Cancelled) if !saga.refunded => {
            publish(PAYMENT_REFUND, &OrderRef::because(&saga.order_id, "paid after the reservation expired"))?;
            saga.refunded = true;
            saga.path.push(format!("{name} -> refund"));
        }
        (PAYMENT_FAILED, Step::Paying) => {
            let reason = format!("payment failed: {}", reply.reason.unwrap_or_default());
            compensate(&mut saga, name, reason)?;
        }
        (PAYMENT_TIMEOUT, Step::Paying) => compensate(&mut saga, name, "reservation expired unpaid".into())?,
        (STOCK_RELEASED, Step::Compensating) => saga.to(Step::Cancelled, name),
        (_, step) => {
            log::debug!("order {key}: {name} in step {} changes nothing", step.as_str());
            return Ok(());
        }
    }
    SAGAS.put(&key, &saga)?;
    log::debug!("order {key}: {} -> {} on {name}", before.as_str(), saga.step.as_str());
    Ok(())
}

struct OrderSaga;

impl Plugin for OrderSaga {
    fn metadata() -> Metadata {
        Metadata::new("order-saga", env!("CARGO_PKG_VERSION"))
            .subscribe([
                ORDER_CREATED,
                PAYMENT_TIMEOUT,
                STOCK_RESERVED,
                STOCK_INSUFFICIENT,
                STOCK_RELEASED,
                PAYMENT_SUCCEEDED,
                PAYMENT_FAILED,
            ])
            .ordering_key(["orderId"])
    }

    fn handle(event: Event) -> Result<()> {
        advance(&event)
    }
}

switchyard_sdk::plugin!(OrderSaga);
