// Validates Kubernetes objects of the Istio and Gateway API kinds with the
// validators the @kubernetes-models packages generate from those projects'
// CRDs. Reads a JSON array of objects on stdin; prints a JSON array with one
// entry per object: {"kind", "name", "checked": bool, "errors": [...]}.
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";
import { EnvoyFilter } from "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway";
import { GatewayClass } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GatewayClass";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";

const models = {
  "extensions.istio.io/v1alpha1/WasmPlugin": WasmPlugin,
  "networking.istio.io/v1alpha3/EnvoyFilter": EnvoyFilter,
  "gateway.networking.k8s.io/v1/Gateway": Gateway,
  "gateway.networking.k8s.io/v1/GatewayClass": GatewayClass,
  "gateway.networking.k8s.io/v1/HTTPRoute": HTTPRoute,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map((obj) => {
  const Model = models[`${obj.apiVersion}/${obj.kind}`];
  const entry = { kind: obj.kind, name: obj.metadata?.name ?? null, checked: !!Model, errors: [] };
  if (Model) {
    try {
      new Model(obj).validate();
    } catch (e) {
      entry.errors.push(String(e.message ?? e));
    }
  }
  return entry;
});
process.stdout.write(JSON.stringify(out));
