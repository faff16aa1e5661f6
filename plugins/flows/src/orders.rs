//! The order saga's events (seed 003): `order-saga` orchestrates, `inventory` reserves and
//! releases stock, `payment` charges. Every payload carries the `orderId` the saga is keyed by.

use serde::{Deserialize, Serialize};
use switchyard_sdk::Id;

pub const ORDER_CREATED: &str = "order.created";
pub const ORDER_CONFIRMED: &str = "order.confirmed";
pub const ORDER_CANCELLED: &str = "order.cancelled";
/// The saga's own delayed event: the reservation was not paid in time.
pub const PAYMENT_TIMEOUT: &str = "order.payment-timeout";
pub const INVENTORY_RESERVE: &str = "inventory.reserve";
pub const INVENTORY_RELEASE: &str = "inventory.release";
pub const STOCK_RESERVED: &str = "stock.reserved";
pub const STOCK_INSUFFICIENT: &str = "stock.insufficient";
pub const STOCK_RELEASED: &str = "stock.released";
pub const PAYMENT_INITIATE: &str = "payment.initiate";
pub const PAYMENT_SUCCEEDED: &str = "payment.succeeded";
pub const PAYMENT_FAILED: &str = "payment.failed";
pub const PAYMENT_REFUND: &str = "payment.refund";
pub const PAYMENT_REFUNDED: &str = "payment.refunded";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: u32,
}

/// `order.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub order_id: Id,
    /// In cents.
    pub amount: u64,
    pub items: Vec<Item>,
}

/// `inventory.reserve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reserve {
    pub order_id: Id,
    pub items: Vec<Item>,
}

/// `payment.initiate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Charge {
    pub order_id: Id,
    pub amount: u64,
}

/// Every other saga event: the order, and why, when it is a refusal or a cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderRef {
    pub order_id: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl OrderRef {
    pub fn new(order_id: &Id) -> Self {
        OrderRef { order_id: order_id.clone(), reason: None }
    }

    pub fn because(order_id: &Id, reason: impl Into<String>) -> Self {
        OrderRef { order_id: order_id.clone(), reason: Some(reason.into()) }
    }
}
