// Publish events exactly as a NestJS service does: ClientProxy.emit(pattern, data).
// Usage: node emit.mjs rmq <amqp url> <queue> <events.json>
//        node emit.mjs redis <redis url> - <events.json>
// <events.json> is a JSON array of {"pattern": ..., "data": ...}.
import 'reflect-metadata';
import { readFileSync } from 'node:fs';
import { ClientProxyFactory, Transport } from '@nestjs/microservices';
import { lastValueFrom } from 'rxjs';

const [transport, url, queue, file] = process.argv.slice(2);
const events = JSON.parse(readFileSync(file, 'utf8'));
const options =
  transport === 'rmq'
    ? { transport: Transport.RMQ, options: { urls: [url], queue, queueOptions: { durable: true } } }
    : { transport: Transport.REDIS, options: { host: new URL(url).hostname, port: Number(new URL(url).port || 6379) } };
const client = ClientProxyFactory.create(options);
await client.connect();
for (const { pattern, data } of events) {
  await lastValueFrom(client.emit(pattern, data), { defaultValue: undefined });
}
await client.close();
